"""Stage 4, select: ALMA-R's preference triplets -> pairs.parquet (+ dropped.parquet, stats.json, margins.png).

Per source, the candidates are the reference and every system's output; each is scored by the mean of the
selection metrics (z-scored first with select.normalize: zscore); chosen = highest, rejected = lowest. Ties go
to the reference, then to systems in config order (for both sides). A human label that ingest read with the
data (ALMA-R-Preference's `Delta`: its human_preferences table) decides instead of the scores when both of its
systems are candidates (select.human_preferences). Every source that yields no pair is recorded with its reason. The paper's "dis-preferred quality
matters" baseline replaces the rejected side by a noised copy of the chosen one. select.pairs keeps more than
one pair per source (best_vs_all, top_k_bottom_k), each weighted 1/n (the pairs' weight column).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from alma_r.config import RunConfig
from alma_r.data.files import save_figure_atomic, write_json_atomic
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, DROPPED, HUMAN_PREFERENCES, PAIRS, REFERENCE, SCORES, SEGMENTS
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.candidates import candidate_paths
from alma_r.tasks.shared.selection import labelled_segments, select_pairs, selection_stats


def plot_margins(pairs: list[dict], out_path: Path) -> Path | None:
    """Histogram of chosen-minus-rejected selection scores, one series per direction."""
    margins: dict[str, list[float]] = defaultdict(list)
    for p in pairs:
        if p["margin"] is not None:
            margins[p["lp"]].append(p["margin"])
    if not margins:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(list(margins.values()), bins=30, label=list(margins), stacked=True)
    ax.set_xlabel("margin (chosen - rejected selection score)")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure_atomic(fig, out_path)


def read_preferences(path: Path | None) -> dict[str, tuple[str, str]]:
    """segment_id -> (chosen, rejected) of ingest's human_preferences table (absent: no labels)."""
    if path is None:
        return {}
    rows = read_rows(path, HUMAN_PREFERENCES)
    return {r["segment_id"]: (r["chosen_system"], r["rejected_system"]) for r in rows}


def run_select(
    cfg: RunConfig,
    segments_path: Path,
    candidate_paths: list[Path],
    score_paths: list[Path],
    out_dir: Path,
    preferences_path: Path | None = None,
) -> tuple[dict, dict]:
    """preferences_path: ingest's human_preferences table, used when select.human_preferences is on."""
    candidates = [row for p in candidate_paths for row in read_rows(p, CANDIDATES)]
    ids = {c["segment_id"] for c in candidates}
    segments = [r for r in read_rows(segments_path, SEGMENTS) if r["id"] in ids]
    texts = {(r["id"], REFERENCE): r["ref"] for r in segments}
    texts.update({(c["segment_id"], c["system"]): c["hypothesis"] for c in candidates})
    scores = {
        (s["segment_id"], s["system"], s["metric"]): s["score"]
        for p in score_paths
        for s in read_rows(p, SCORES)
    }
    s = cfg.select
    preferences = read_preferences(preferences_path) if s.human_preferences else {}
    pairs, dropped = select_pairs(
        segments,
        texts,
        scores,
        [n for d in cfg.generate.systems for n in d.system_names()],
        s.metrics or cfg.score.metrics,
        s.min_margin,
        rejected=s.rejected,
        noise=(s.noise_delete, s.noise_swap),
        seed=cfg.run.seed,
        preferences=preferences,
        normalize=s.normalize,
        pairs_mode=s.pairs,
        top_k=s.top_k,
    )
    labelled = labelled_segments(pairs, preferences, texts)
    stats = selection_stats(pairs, dropped, labelled)
    outputs = {
        "pairs": write_table(pairs, out_dir / "pairs.parquet", PAIRS),
        "dropped": write_table(dropped, out_dir / "dropped.parquet", DROPPED),
        "stats": write_json_atomic(out_dir / "stats.json", stats),
    }
    plot = plot_margins(pairs, out_dir / "margins.png")
    if plot:
        outputs["margins_plot"] = plot
    dropped_counts = {f"dropped_{k}": v for k, v in stats["dropped"].items()}
    return outputs, {"pairs": len(pairs), "from_human_labels": len(labelled), **dropped_counts}


def select_key(
    cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult, scores: StageResult
) -> StageKey:
    key = stage_key(
        "select",
        cfg.section_hash("select", "score"),
        [segments, candidates, scores],
        extra=cfg.run.seed,
        module=__name__,
    )
    return StageKey("select", Path(run_dir) / "select", key)


def select_stage(
    cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult, scores: StageResult
) -> StageResult:
    """Build (prompt, chosen, rejected) triplets from the scores."""
    cand = candidate_paths(candidates)
    scored = [Path(v) for k, v in sorted(scores.outputs.items()) if k.startswith("scores/")]
    labels = segments.path("human_preferences") if "human_preferences" in segments.outputs else None
    return run_stage(
        select_key(cfg, run_dir, segments, candidates, scores),
        lambda out: run_select(cfg, segments.path("segments"), cand, scored, out, preferences_path=labels),
    )


select_task = stage_task(select_stage, select_key)
