"""Stage 4, select: ALMA-R's preference triplets -> pairs.parquet (+ dropped.parquet, stats.json, margins.png).

Per source, the candidates are the reference and every system's output; each is scored by the mean of the
selection metrics; chosen = highest, rejected = lowest. Ties go to the reference, then to systems in config
order (for both sides). A human label (the published data's `Delta`) overrides the scores between two named
systems. Every source that yields no pair is recorded with its reason. The paper's "dis-preferred quality
matters" baseline replaces the rejected side by a noised copy of the chosen one.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from pathlib import Path

from alma_r.config import RunConfig
from alma_r.data.io import read_rows, save_figure_atomic, write_json_atomic, write_table
from alma_r.data.schemas import CANDIDATES, DROPPED, PAIRS, REFERENCE, SCORES, SEGMENTS
from alma_r.models.prompts import make_prompt
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.candidates import candidate_paths

NOISE = "noise"


def add_noise(text: str, rng: random.Random, p_delete: float = 0.15, p_swap: float = 0.3) -> tuple[str, dict]:
    """Each word deleted with p_delete, then each adjacent pair of the survivors swapped with p_swap (a swapped
    pair is not considered again). Returns the text and counts: words, deleted, swap trials, swaps."""
    words = text.split()
    kept = [w for w in words if rng.random() >= p_delete]
    stats = {"words": len(words), "deleted": len(words) - len(kept), "swap_trials": 0, "swaps": 0}
    i = 0
    while i < len(kept) - 1:
        stats["swap_trials"] += 1
        if rng.random() < p_swap:
            kept[i], kept[i + 1] = kept[i + 1], kept[i]
            stats["swaps"] += 1
            i += 2
        else:
            i += 1
    return " ".join(kept), stats


def _segment_rng(seed: int, segment_id: str) -> random.Random:
    """One generator per segment: the noise of a segment does not depend on which other segments exist."""
    return random.Random(int(hashlib.sha256(f"{seed}:{segment_id}".encode()).hexdigest()[:16], 16))


def select_pairs(
    segments: list[dict],
    texts: dict[tuple[str, str], str],
    scores: dict[tuple[str, str, str], float],
    systems: list[str],
    metrics: list[str],
    min_margin: float = 0.0,
    human_labels: dict[str, float] | None = None,
    override_systems: tuple[str, str] | None = None,
    rejected: str = "worst",
    noise: tuple[float, float] = (0.15, 0.3),
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """The selection rule, pure.

    texts: (segment_id, system) -> translation (the reference under system 'reference');
    scores: (segment_id, system, metric) -> score; human_labels: segment_id -> Delta, where Delta > 0 chooses
    override_systems[0] over override_systems[1], Delta < 0 the reverse, 0 leaves it to the scores.
    rejected: "worst" (ALMA-R) or "noise" (the noised chosen translation). Returns (pairs, dropped).
    """
    order = [REFERENCE, *systems]
    pairs, dropped = [], []

    def drop(seg, reason, detail):
        dropped.append({"segment_id": seg["id"], "lp": seg["lp"], "reason": reason, "detail": detail})

    for seg in segments:
        sid = seg["id"]
        present = [s for s in order if (sid, s) in texts]
        scored = [s for s in present if all((sid, s, m) in scores for m in metrics)]
        if len(scored) < len(present):
            drop(seg, "missing_score", f"no score for {sorted(set(present) - set(scored))}")
            continue
        if len(scored) < (1 if rejected == "noise" else 2):
            drop(seg, "too_few_candidates", f"candidates: {scored}")
            continue
        mean = {s: sum(scores[(sid, s, m)] for m in metrics) / len(metrics) for s in scored}
        delta = (human_labels or {}).get(sid, 0.0)
        if delta and override_systems and all(s in scored for s in override_systems):
            chosen, worst = override_systems if delta > 0 else override_systems[::-1]
        else:
            # max()/min() return the first of equal elements, and `scored` is in tie-break order.
            chosen = max(scored, key=lambda s: mean[s])
            worst = min(scored, key=lambda s: mean[s])
        if rejected == "noise":
            rejected_text, _ = add_noise(texts[(sid, chosen)], _segment_rng(seed, sid), *noise)
            rejected_system, rejected_score, margin = NOISE, None, None
        else:
            rejected_text, rejected_system = texts[(sid, worst)], worst
            rejected_score, margin = mean[worst], mean[chosen] - mean[worst]
        if texts[(sid, chosen)].strip() == rejected_text.strip():
            drop(
                seg,
                "chosen_equals_rejected",
                "every candidate scored the same"
                if chosen == rejected_system
                else f"{chosen} vs {rejected_system}",
            )
            continue
        if margin is not None and margin < min_margin and not delta:
            drop(seg, "margin_below_threshold", f"{margin:.4f} < {min_margin}")
            continue
        pairs.append(
            {
                "prompt": make_prompt(seg["src"], seg["src_lang"], seg["tgt_lang"]),
                "chosen": texts[(sid, chosen)],
                "rejected": rejected_text,
                "segment_id": sid,
                "lp": seg["lp"],
                "chosen_system": chosen,
                "rejected_system": rejected_system,
                "chosen_score": mean[chosen],
                "rejected_score": rejected_score,
                "margin": margin,
            }
        )
    return pairs, dropped


def selection_stats(pairs: list[dict], dropped: list[dict]) -> dict:
    """The paper's Table 2 layout: share of chosen (and rejected) translations by system, per direction."""
    by_lp: dict[str, dict] = defaultdict(lambda: {"pairs": 0, "chosen": Counter(), "rejected": Counter()})
    for p in pairs:
        entry = by_lp[p["lp"]]
        entry["pairs"] += 1
        entry["chosen"][p["chosen_system"]] += 1
        entry["rejected"][p["rejected_system"]] += 1
    return {
        "pairs": len(pairs),
        "dropped": dict(Counter(d["reason"] for d in dropped)),
        "by_lp": {
            lp: {"pairs": e["pairs"], "chosen": dict(e["chosen"]), "rejected": dict(e["rejected"])}
            for lp, e in sorted(by_lp.items())
        },
    }


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


def run_select(
    cfg: RunConfig, segments_path: Path, candidate_paths: list[Path], score_paths: list[Path], out_dir: Path
) -> tuple[dict, dict]:
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
    )
    stats = selection_stats(pairs, dropped)
    outputs = {
        "pairs": write_table(pairs, out_dir / "pairs.parquet", PAIRS),
        "dropped": write_table(dropped, out_dir / "dropped.parquet", DROPPED),
        "stats": write_json_atomic(out_dir / "stats.json", stats),
    }
    plot = plot_margins(pairs, out_dir / "margins.png")
    if plot:
        outputs["margins_plot"] = plot
    return outputs, {"pairs": len(pairs), **{f"dropped_{k}": v for k, v in stats["dropped"].items()}}


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
    return run_stage(
        select_key(cfg, run_dir, segments, candidates, scores),
        lambda out: run_select(cfg, segments.path("segments"), cand, scored, out),
    )


select_task = stage_task(select_stage, select_key)
