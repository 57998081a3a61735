"""Stage 3, score: the reference and every candidate, by every configured metric -> scores/<metric>.parquet.

Each distinct request (metric model, src, mt[, ref]) is scored once: requests are deduplicated within the run
(a system output equal to the reference is scored once) and looked up in a content-addressed cache shared by
runs, stages and reruns; the stage reports how many were scored and how many came from the cache.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alma_r.config import RunConfig
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, SCORES, SEGMENTS
from alma_r.models.score_cache import ScoreCache
from alma_r.models.scoring import ScoringError, cache_path_for, make_scorer, score_items
from alma_r.tasks.stage import StageResult, run_stage, stage_key

REFERENCE = "reference"


def check_coverage(candidates: list[dict], segments: dict[str, dict], where: str) -> None:
    """Every candidate belongs to a known segment, and every system covers the same segments."""
    unknown = sorted({c["segment_id"] for c in candidates} - set(segments))
    if unknown:
        raise ScoringError(f"{where}: {len(unknown)} candidate(s) for unknown segments, e.g. {unknown[:3]}")
    by_system: dict[str, set[str]] = defaultdict(set)
    for c in candidates:
        by_system[c["system"]].add(c["segment_id"])
    every = set().union(*by_system.values()) if by_system else set()
    for system, ids in sorted(by_system.items()):
        missing = sorted(every - ids)
        if missing:
            raise ScoringError(
                f"{where}: system '{system}' has no candidate for {len(missing)} segment(s) the "
                f"others cover, e.g. {missing[:3]}"
            )


def run_score(
    cfg: RunConfig, segments_path: Path, candidate_paths: list[Path], out_dir: Path, cache_path: Path
) -> tuple[dict, dict]:
    segments = {r["id"]: r for r in read_rows(segments_path, SEGMENTS)}
    candidates = [row for p in candidate_paths for row in read_rows(p, CANDIDATES)]
    check_coverage(
        candidates, segments, where=str(candidate_paths[0].parent) if candidate_paths else "candidates"
    )
    order = {segment_id: i for i, segment_id in enumerate(segments)}
    texts: dict[str, dict[str, str]] = defaultdict(dict)  # segment id -> system -> text
    for c in candidates:
        texts[c["segment_id"]][c["system"]] = c["hypothesis"]
    # The reference competes as a system of its own (ALMA-R's triplets: reference, GPT-4, ALMA).
    for segment_id in texts:
        texts[segment_id] = {REFERENCE: segments[segment_id]["ref"], **texts[segment_id]}
    cache = ScoreCache(cache_path)
    outputs, counts = {}, {}
    for metric in cfg.score.metrics:
        rows, scorers = [], {}
        by_lang: dict[str, list] = defaultdict(list)
        for segment_id in sorted(texts, key=order.__getitem__):
            seg = segments[segment_id]
            for system, text in texts[segment_id].items():
                others = [t for s, t in texts[segment_id].items() if s != system]
                by_lang[seg["tgt_lang"]].append((seg, system, text, others))
        for lang, items in by_lang.items():
            # BLEU's tokenizer depends on the target language; a model-based scorer is loaded once.
            which = lang if metric == "bleu" else "*"
            if which not in scorers:
                scorers[which] = make_scorer(cfg, metric, lang)
            rows += score_items(scorers[which], metric, items, cache, counts)
        outputs[f"scores/{metric}"] = write_table(rows, out_dir / "scores" / f"{metric}.parquet", SCORES)
    return outputs, counts


@task(name="score", cache_policy=NO_CACHE)
def score_task(cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult) -> StageResult:
    """Score the reference and every candidate."""
    key = stage_key("score", cfg.section_hash("score"), [segments, candidates])
    paths = [Path(v) for k, v in sorted(candidates.outputs.items()) if k.startswith("candidates/")]
    return run_stage(
        "score",
        run_dir / "score",
        key,
        lambda out: run_score(cfg, segments.path("segments"), paths, out, cache_path_for(cfg)),
    )
