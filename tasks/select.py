"""Stage 4, select: ALMA-R's preference triplets -> pairs.parquet (+ dropped.parquet, stats.json).

Per source, the candidates are the reference and every system's output; each is scored by the mean of the
selection metrics; chosen = highest, rejected = lowest. Ties go to the reference, then to systems in config
order (for both sides). Every source that yields no pair is recorded with its reason.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alma_r.config import RunConfig
from alma_r.data.io import read_rows, write_json_atomic, write_table
from alma_r.data.schemas import CANDIDATES, DROPPED, PAIRS, SCORES, SEGMENTS
from alma_r.models.prompts import make_prompt
from alma_r.tasks.stage import StageResult, run_stage, stage_key

REFERENCE = "reference"


def select_pairs(
    segments: list[dict],
    texts: dict[tuple[str, str], str],
    scores: dict[tuple[str, str, str], float],
    systems: list[str],
    metrics: list[str],
    min_margin: float = 0.0,
) -> tuple[list[dict], list[dict]]:
    """The selection rule, pure.

    texts: (segment_id, system) -> translation (the reference under system 'reference');
    scores: (segment_id, system, metric) -> score. Returns (pairs, dropped).
    """
    order = [REFERENCE, *systems]
    pairs, dropped = [], []
    for seg in segments:
        sid = seg["id"]
        present = [s for s in order if (sid, s) in texts]
        scored = [s for s in present if all((sid, s, m) in scores for m in metrics)]
        if len(scored) < len(present):
            missing = sorted(set(present) - set(scored))
            dropped.append(
                {
                    "segment_id": sid,
                    "lp": seg["lp"],
                    "reason": "missing_score",
                    "detail": f"no score for {missing}",
                }
            )
            continue
        if len(scored) < 2:
            dropped.append(
                {
                    "segment_id": sid,
                    "lp": seg["lp"],
                    "reason": "too_few_candidates",
                    "detail": f"candidates: {scored}",
                }
            )
            continue
        mean = {s: sum(scores[(sid, s, m)] for m in metrics) / len(metrics) for s in scored}
        # max()/min() return the first of equal elements, and `scored` is in tie-break order.
        chosen = max(scored, key=lambda s: mean[s])
        rejected = min(scored, key=lambda s: mean[s])
        margin = mean[chosen] - mean[rejected]
        if texts[(sid, chosen)].strip() == texts[(sid, rejected)].strip():
            dropped.append(
                {
                    "segment_id": sid,
                    "lp": seg["lp"],
                    "reason": "chosen_equals_rejected",
                    "detail": "every candidate scored the same"
                    if chosen == rejected
                    else f"{chosen} vs {rejected}",
                }
            )
            continue
        if margin < min_margin:
            dropped.append(
                {
                    "segment_id": sid,
                    "lp": seg["lp"],
                    "reason": "margin_below_threshold",
                    "detail": f"{margin:.4f} < {min_margin}",
                }
            )
            continue
        pairs.append(
            {
                "prompt": make_prompt(seg["src"], seg["src_lang"], seg["tgt_lang"]),
                "chosen": texts[(sid, chosen)],
                "rejected": texts[(sid, rejected)],
                "segment_id": sid,
                "lp": seg["lp"],
                "chosen_system": chosen,
                "rejected_system": rejected,
                "chosen_score": mean[chosen],
                "rejected_score": mean[rejected],
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
    metrics = cfg.select.metrics or cfg.score.metrics
    pairs, dropped = select_pairs(
        segments,
        texts,
        scores,
        [n for s in cfg.generate.systems for n in s.system_names()],
        metrics,
        cfg.select.min_margin,
    )
    stats = selection_stats(pairs, dropped)
    outputs = {
        "pairs": write_table(pairs, out_dir / "pairs.parquet", PAIRS),
        "dropped": write_table(dropped, out_dir / "dropped.parquet", DROPPED),
        "stats": write_json_atomic(out_dir / "stats.json", stats),
    }
    return outputs, {"pairs": len(pairs), **{f"dropped_{k}": v for k, v in stats["dropped"].items()}}


@task(name="select", cache_policy=NO_CACHE)
def select_task(
    cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult, scores: StageResult
) -> StageResult:
    """Build (prompt, chosen, rejected) triplets from the scores."""
    key = stage_key("select", cfg.section_hash("select", "score"), [segments, candidates, scores])
    cand = [Path(v) for k, v in sorted(candidates.outputs.items()) if k.startswith("candidates/")]
    scored = [Path(v) for k, v in sorted(scores.outputs.items()) if k.startswith("scores/")]
    return run_stage(
        "select",
        run_dir / "select",
        key,
        lambda out: run_select(cfg, segments.path("segments"), cand, scored, out),
    )
