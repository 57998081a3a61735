"""Stage 3, score: the reference and every candidate, by every configured metric -> scores/<metric>.parquet.

Each distinct request (metric model, src, mt[, ref]) is scored once: requests are deduplicated within the run
(a system output equal to the reference is scored once) and looked up in a content-addressed cache shared by
runs, stages and reruns; the stage reports how many were scored and how many came from the cache.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alma_r.config import RunConfig, config_base_dir, resolve_path
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, SCORES, SEGMENTS
from alma_r.models.score_cache import ScoreCache, score_key
from alma_r.models.scorers import ConsensusScorer, SacrebleuScorer
from alma_r.tasks.stage import StageResult, run_stage, stage_key

REFERENCE = "reference"


class ScoringError(ValueError):
    """Scores that cannot be trusted; the message names the segments, systems and metric."""


def comet_model_path(value: str, base_dir: Path) -> str:
    """A local checkpoint path resolved against the config's folder; anything else is a hub id."""
    path = resolve_path(value, base_dir)
    return str(path) if value.startswith("sample:") or path.exists() else value


def make_scorer(cfg: RunConfig, metric: str, tgt_lang: str):
    if metric in ("chrf", "bleu"):
        return SacrebleuScorer(metric, tgt_lang)
    if metric == "consensus_chrf":
        return ConsensusScorer()
    import torch

    from alma_r.models.comet_scorer import CometScorer
    from alma_r.models.comet_workers import ShardedCometScorer

    spec = cfg.score.comet_models[metric]
    model = comet_model_path(spec.model, config_base_dir(cfg))
    processes = cfg.score.processes or max(torch.cuda.device_count(), 1)
    if processes > 1:  # one worker process per GPU, each on its own shard
        return ShardedCometScorer(model, processes, batch_size=cfg.score.batch_size, reference=spec.reference)
    return CometScorer(model, batch_size=cfg.score.batch_size, reference=spec.reference)


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


def score_items(
    scorer, metric: str, items: list[tuple[dict, str, str, list[str]]], cache: ScoreCache, counts: dict
) -> list[dict]:
    """Score (segment, system, text, other candidates) items, each distinct request once; rows for SCORES."""
    requests, keys = {}, []
    for seg, _system, text, others in items:
        request = {"src": seg["src"], "mt": text}
        if scorer.uses_reference:
            request["ref"] = seg["ref"]
        context = None
        if isinstance(scorer, ConsensusScorer):
            request["pseudo_refs"] = sorted(others)
            context = request["pseudo_refs"]
        key = score_key(scorer.model_id, request["src"], text, request.get("ref"), context)
        keys.append(key)
        requests.setdefault(key, request)
    cached = cache.get_many(list(requests))
    todo = [k for k in requests if k not in cached]
    fresh = dict(zip(todo, scorer.score([requests[k] for k in todo]), strict=True)) if todo else {}
    for key, result in fresh.items():
        if not math.isfinite(result.score):
            bad = [
                (seg["id"], system) for (seg, system, _, _), k in zip(items, keys, strict=True) if k == key
            ]
            raise ScoringError(
                f"metric '{metric}' ({scorer.model_id}) gave {result.score} for segment/system {bad[:3]}"
            )
    cache.put_many({k: (r.score, r.error_spans) for k, r in fresh.items()})
    counts[f"{metric}/requests"] = counts.get(f"{metric}/requests", 0) + len(items)
    counts[f"{metric}/distinct"] = counts.get(f"{metric}/distinct", 0) + len(requests)
    counts[f"{metric}/from_cache"] = counts.get(f"{metric}/from_cache", 0) + len(cached)
    counts[f"{metric}/scored"] = counts.get(f"{metric}/scored", 0) + len(fresh)
    rows = []
    for (seg, system, text, _), key in zip(items, keys, strict=True):
        score, spans = (fresh[key].score, fresh[key].error_spans) if key in fresh else cached[key]
        rows.append(
            {
                "segment_id": seg["id"],
                "lp": seg["lp"],
                "system": system,
                "metric": metric,
                "model_id": scorer.model_id,
                "score": float(score),
                "error_spans": json.dumps(spans, ensure_ascii=False) if spans is not None else None,
                "flag": None if text.strip() else "empty_hypothesis",
            }
        )
    return rows


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


def cache_path_for(cfg: RunConfig) -> Path:
    return (
        Path(cfg.score.cache_path).expanduser()
        if cfg.score.cache_path
        else (Path(cfg.run.root) / "_cache" / "scores.sqlite").resolve()
    )


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
