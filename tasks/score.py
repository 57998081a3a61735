"""Stage 3, score: every candidate and the reference, by every configured metric -> scores/<metric>.parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alma_r.config import RunConfig
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, SCORES, SEGMENTS
from alma_r.models.scorers import sentence_scores
from alma_r.tasks.stage import StageResult, run_stage, stage_key

REFERENCE = "reference"


def run_score(
    cfg: RunConfig, segments_path: Path, candidate_paths: list[Path], out_dir: Path
) -> tuple[dict, dict]:
    segments = {r["id"]: r for r in read_rows(segments_path, SEGMENTS)}
    candidates = [row for p in candidate_paths for row in read_rows(p, CANDIDATES)]
    # The reference competes as a system of its own (ALMA-R's triplets: reference, GPT-4, ALMA).
    order = {segment_id: i for i, segment_id in enumerate(segments)}
    ids = sorted({c["segment_id"] for c in candidates}, key=order.__getitem__)
    items = [(segments[i], REFERENCE, segments[i]["ref"]) for i in ids]
    items += [(segments[c["segment_id"]], c["system"], c["hypothesis"]) for c in candidates]
    outputs, counts = {}, {}
    for metric in cfg.score.metrics:
        rows = []
        for lp in sorted({seg["lp"] for seg, _, _ in items}):
            group = [(seg, system, text) for seg, system, text in items if seg["lp"] == lp]
            scores, signature = sentence_scores(
                metric,
                [t for _, _, t in group],
                [s["ref"] for s, _, _ in group],
                tgt_lang=group[0][0]["tgt_lang"],
            )
            rows += [
                {
                    "segment_id": seg["id"],
                    "lp": lp,
                    "system": system,
                    "metric": metric,
                    "model_id": signature,
                    "score": score,
                }
                for (seg, system, _), score in zip(group, scores, strict=True)
            ]
        outputs[f"scores/{metric}"] = write_table(rows, out_dir / "scores" / f"{metric}.parquet", SCORES)
        counts[f"{metric}/scored"] = len(rows)
    return outputs, counts


@task(name="score", cache_policy=NO_CACHE)
def score_task(cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult) -> StageResult:
    """Score the reference and every candidate."""
    key = stage_key("score", cfg.section_hash("score"), [segments, candidates])
    paths = [Path(v) for k, v in sorted(candidates.outputs.items()) if k.startswith("candidates/")]
    return run_stage(
        "score", run_dir / "score", key, lambda out: run_score(cfg, segments.path("segments"), paths, out)
    )
