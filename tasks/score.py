"""Stage 3, score: the reference and every candidate, by every configured metric -> scores/<metric>.parquet.

Each distinct request (metric model, src, mt[, ref]) is scored once: requests are deduplicated within the run
(a system output equal to the reference is scored once) and looked up in a content-addressed cache shared by
runs, stages and reruns; the stage reports how many were scored and how many came from the cache. A metric
`published:<name>` runs no model: its scores are those an hf_dataset source carried (ingest's published_scores).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from alma_r.config import RunConfig
from alma_r.data.hub_datasets import published_name
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, REFERENCE, SCORES, SEGMENTS
from alma_r.models.score.cache import ScoreCache
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.candidates import candidate_paths
from alma_r.tasks.shared.scoring import (
    LanguageScorers,
    PublishedScores,
    ScoringError,
    cache_path_for,
    resolved_records,
    score_items,
)


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
    cfg: RunConfig,
    segments_path: Path,
    candidate_paths: list[Path],
    out_dir: Path,
    cache_path: Path,
    only: set[str] | None = None,
    published: Path | None = None,
    ingested: Path | None = None,
) -> tuple[dict, dict]:
    """Score every candidate (of the segments in `only`, when given). Rows come in segment order, then system
    order (reference first), whatever order the scorers ran in. `published` / `ingested`: ingest's
    published_scores and ingested_translations tables, read by the `published:<name>` metrics."""
    segments = {r["id"]: r for r in read_rows(segments_path, SEGMENTS)}
    candidates = [row for p in candidate_paths for row in read_rows(p, CANDIDATES)]
    check_coverage(
        candidates, segments, where=str(candidate_paths[0].parent) if candidate_paths else "candidates"
    )
    if only is not None:
        candidates = [c for c in candidates if c["segment_id"] in only]
    order = {segment_id: i for i, segment_id in enumerate(segments)}
    texts: dict[str, dict[str, str]] = defaultdict(dict)  # segment id -> system -> text
    for c in candidates:
        texts[c["segment_id"]][c["system"]] = c["hypothesis"]
    # The reference competes as a system of its own (ALMA-R's triplets: reference, GPT-4, ALMA).
    for segment_id in texts:
        texts[segment_id] = {REFERENCE: segments[segment_id]["ref"], **texts[segment_id]}
    cache = ScoreCache(cache_path)
    carried = PublishedScores(published, ingested) if any(map(published_name, cfg.score.metrics)) else None
    outputs, counts, used = {}, {}, []
    for metric in cfg.score.metrics:
        rows, scorer_for = [], LanguageScorers(cfg, metric)
        by_lang: dict[str, list] = defaultdict(list)
        for segment_id in sorted(texts, key=order.__getitem__):
            seg = segments[segment_id]
            for system, text in texts[segment_id].items():
                others = [t for s, t in texts[segment_id].items() if s != system]
                by_lang[seg["tgt_lang"]].append((seg, system, text, others))
        for lang, items in by_lang.items():
            if carried is not None and published_name(metric):
                rows += carried.rows(metric, items, counts)
                continue
            rows += score_items(scorer_for(lang), metric, items, cache, counts)
        used += scorer_for.made.values()
        position = {(s, system): i for s in texts for i, system in enumerate(texts[s])}
        rows.sort(key=lambda r: (order[r["segment_id"]], position[r["segment_id"], r["system"]]))
        outputs[f"scores/{metric}"] = write_table(rows, out_dir / "scores" / f"{metric}.parquet", SCORES)
    if resolved := resolved_records(used):
        counts["resolved"] = resolved
    return outputs, counts


def ingest_tables(segments: StageResult) -> dict[str, Path | None]:
    """The ingest tables the published: metrics read (absent when no source carried them); the ingest stage's
    key, an upstream of this stage's, covers their content."""
    outputs = segments.outputs
    return {
        "published": Path(outputs["published_scores"]) if "published_scores" in outputs else None,
        "ingested": Path(outputs["ingested_translations"]) if "ingested_translations" in outputs else None,
    }


def score_key(cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult) -> StageKey:
    key = stage_key("score", cfg.section_hash("score"), [segments, candidates], module=__name__)
    return StageKey("score", Path(run_dir) / "score", key)


def score_stage(cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult) -> StageResult:
    """Score the reference and every candidate."""
    return run_stage(
        score_key(cfg, run_dir, segments, candidates),
        lambda out: run_score(
            cfg,
            segments.path("segments"),
            candidate_paths(candidates),
            out,
            cache_path_for(cfg),
            **ingest_tables(segments),
        ),
    )


# ------------------------------------------------------------------------------------------ sharded scoring
# Shards are contiguous runs of segments in ingest order, each a cached stage of its own; merging them in
# shard order gives the unsharded table row for row (run_score writes rows in segment order, then system).


def score_shard_key(
    cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult, shard: int, shards: int
) -> StageKey:
    key = stage_key(
        "score_shard",
        cfg.section_hash("score"),
        [segments, candidates],
        extra=[shard, shards],
        module=__name__,
    )
    return StageKey(
        f"score_shard_{shard}", Path(run_dir) / "score-shards" / f"{shard:03d}-of-{shards:03d}", key
    )


def score_shard_stage(
    cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult, shard: int, shards: int
) -> StageResult:
    """Score one shard of the segments."""
    ids = [r["id"] for r in read_rows(segments.path("segments"), SEGMENTS)]
    size = -(-len(ids) // shards)
    mine = set(ids[shard * size : (shard + 1) * size])
    return run_stage(
        score_shard_key(cfg, run_dir, segments, candidates, shard, shards),
        lambda out: run_score(
            cfg,
            segments.path("segments"),
            candidate_paths(candidates),
            out,
            cache_path_for(cfg),
            only=mine,
            **ingest_tables(segments),
        ),
    )


def score_merge_key(
    cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult, shards: list[StageResult]
) -> StageKey:
    return score_key(cfg, run_dir, segments, candidates)  # the same table as unsharded scoring, the same key


def score_merge_stage(
    cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult, shards: list[StageResult]
) -> StageResult:
    """Concatenate the shards' scores in shard order: the same table as one unsharded score stage."""

    def merge(out_dir: Path) -> tuple[dict, dict]:
        outputs, counts = {}, defaultdict(int)
        for metric in cfg.score.metrics:
            rows = [row for s in shards for row in read_rows(s.path(f"scores/{metric}"), SCORES)]
            outputs[f"scores/{metric}"] = write_table(rows, out_dir / "scores" / f"{metric}.parquet", SCORES)
        resolved = []
        for s in shards:
            for name, value in s.counts.items():
                if name == "resolved":  # the shards' COMET snapshots, each listed once
                    resolved += [r for r in value if r not in resolved]
                else:
                    counts[name] += value
        return outputs, {**counts, "shards": len(shards), **({"resolved": resolved} if resolved else {})}

    return run_stage(score_key(cfg, run_dir, segments, candidates), merge)


def score_summary(result: StageResult) -> list[dict]:
    """Mean score and count per (metric, system): what the UI table shows."""
    table = []
    for name in sorted(k for k in result.outputs if k.startswith("scores/")):
        by_system: dict[str, list[float]] = defaultdict(list)
        for row in read_rows(result.path(name), SCORES):
            by_system[row["system"]].append(row["score"])
        for system, values in by_system.items():
            mean = sum(values) / len(values)
            table.append(
                {
                    "metric": name.removeprefix("scores/"),
                    "system": system,
                    "mean": round(mean, 4),
                    "n": len(values),
                }
            )
    return table


def publish_scores(cfg: RunConfig, result: StageResult) -> None:
    """The per-system score means as a Prefect table artifact."""
    try:
        from prefect.artifacts import create_table_artifact

        slug = cfg.run.name.lower().replace("_", "-")
        create_table_artifact(
            table=score_summary(result),
            key=f"alma-r-scores-{slug}",
            description="Mean score per metric and system",
        )
    except Exception as err:  # the Parquet on disk is what matters; the UI copy is a convenience
        print(f"[score] could not publish the scores artifact: {err}")


score_task = stage_task(score_stage, score_key, gpu=True, publish=publish_scores)
score_shard_task = stage_task(score_shard_stage, score_shard_key, gpu=True)
score_merge_task = stage_task(score_merge_stage, score_merge_key, publish=publish_scores)
