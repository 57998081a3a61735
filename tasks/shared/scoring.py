"""Scoring shared by the score and evaluate stages: the scorer for a metric name, and scoring many items with
each distinct request sent to the model once (deduplicated, and looked up in the content-addressed cache); the
published scores an ingest source carried, for the metrics `published:<name>`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from alma_r.config import RunConfig, config_base_dir, resolve_path
from alma_r.data.hub_datasets import published_name
from alma_r.data.io import read_rows
from alma_r.data.schemas import INGESTED_TRANSLATIONS, PUBLISHED_SCORES, REFERENCE
from alma_r.models import progress
from alma_r.models.score.cache import ScoreCache, score_key
from alma_r.models.score.scorers import ConsensusScorer, SacrebleuScorer


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

    from alma_r.models.score.comet_scorer import CometScorer
    from alma_r.models.score.comet_workers import ShardedCometScorer

    spec = cfg.score.comet_models[metric]
    model = comet_model_path(spec.model, config_base_dir(cfg))
    processes = cfg.score.processes or max(torch.cuda.device_count(), 1)
    options = {"batch_size": cfg.score.batch_size, "reference": spec.reference, "revision": spec.revision}
    if processes > 1:  # one worker process per GPU, each on its own shard
        return ShardedCometScorer(model, processes, **options)
    return CometScorer(model, **options)


class LanguageScorers:
    """One metric's scorer per target language, each built on first use: BLEU's tokenizer depends on the target
    language, every other scorer (chrF, consensus chrF, a COMET model) is built once for all of them."""

    def __init__(self, cfg: RunConfig, metric: str):
        self.cfg, self.metric, self.made = cfg, metric, {}

    def __call__(self, tgt_lang: str):
        which = tgt_lang if self.metric == "bleu" else "*"
        if which not in self.made:
            self.made[which] = make_scorer(self.cfg, self.metric, tgt_lang)
        return self.made[which]


def resolved_records(scorers) -> list[dict]:
    """The Hub snapshots the scorers' COMET checkpoints came from (id, revision, commit), for a stage's counts
    (`resolved`, collected into run.json's `hub`); string metrics and local checkpoints have none."""
    records = []
    for scorer in scorers:
        snapshot = getattr(scorer, "resolved", None)
        if snapshot is not None and snapshot.record() not in records:
            records.append(snapshot.record())
    return records


PROGRESS_BLOCK = (
    2048  # requests per scorer call: large enough for full batches, small enough to show progress
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
    fresh = {}
    progress.report(0, len(todo), f"score {metric}", unit="request")  # the rate counts from here
    for start in range(0, len(todo), PROGRESS_BLOCK):
        block = todo[start : start + PROGRESS_BLOCK]
        fresh.update(zip(block, scorer.score([requests[k] for k in block]), strict=True))
        progress.report(start + len(block), len(todo), f"score {metric}", unit="request")
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


class PublishedScores:
    """The scores ingest's hf_dataset sources carried (its published_scores table), for the metrics
    `published:<name>`: looked up, never computed. Such a score belongs to the dataset's own translation, so a
    candidate is given it only when its text is that translation (ingest's ingested_translations)."""

    def __init__(self, published: Path | None, ingested: Path | None):
        self.present = published is not None
        self.scores = {
            (r["segment_id"], r["system"], r["metric"]): r
            for r in (read_rows(published, PUBLISHED_SCORES) if published else [])
        }
        self.texts = {
            (r["segment_id"], r["system"]): r["hypothesis"]
            for r in (read_rows(ingested, INGESTED_TRANSLATIONS) if ingested else [])
        }

    def carried(self, metric: str) -> list[str]:
        return sorted({system for (_, system, m) in self.scores if m == metric})

    def rows(self, metric: str, items: list[tuple[dict, str, str, list[str]]], counts: dict) -> list[dict]:
        """SCORES rows of (segment, system, text, others) items; a candidate without a published score is one
        line naming the metric, system and segment, and the systems the dataset carries scores for."""
        if not self.present:
            raise ScoringError(
                f"metric '{metric}': ingest wrote no published scores (an hf_dataset source lists "
                f"'{published_name(metric)}' in published_scores and carries them)"
            )
        rows = []
        for seg, system, text, _ in items:
            row = self.scores.get((seg["id"], system, metric))
            if row is None:
                raise ScoringError(
                    f"metric '{metric}': no published score for system '{system}' on segment '{seg['id']}'; "
                    f"the dataset carries them for systems {self.carried(metric)}"
                )
            if system != REFERENCE and self.texts.get((seg["id"], system)) != text:
                raise ScoringError(
                    f"metric '{metric}': system '{system}' on segment '{seg['id']}' is not the translation the "
                    "dataset published its score for (give the system backend ingested)"
                )
            rows.append(
                {
                    "segment_id": seg["id"],
                    "lp": seg["lp"],
                    "system": system,
                    "metric": metric,
                    "model_id": f"published by {row['origin']}",
                    "score": row["score"],
                    "error_spans": None,
                    "flag": None if text.strip() else "empty_hypothesis",
                }
            )
        counts[f"{metric}/published"] = counts.get(f"{metric}/published", 0) + len(rows)
        return rows


def cache_path_for(cfg: RunConfig) -> Path:
    return (
        Path(cfg.score.cache_path).expanduser()
        if cfg.score.cache_path
        else (Path(cfg.run.root) / "_cache" / "scores.sqlite").resolve()
    )
