"""Stage 1b, prepare the base model: build the tiny local model, or hand a hub id / folder through
(tasks/shared/base_model.py, shared with the sequence-cpo flow)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from alma_r.config import RunConfig
from alma_r.data.io import read_rows
from alma_r.data.schemas import SEGMENTS
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage
from alma_r.tasks.shared import base_model


def training_texts(segments_path: Path) -> list[str]:
    """Sources and references of every split but test: test sets must not leak into the vocabulary."""
    segments = [r for r in read_rows(segments_path, SEGMENTS) if r["split"] != "test"]
    return [r["src"] for r in segments] + [r["ref"] for r in segments if r["ref"]]


def prepare_model_key(cfg: RunConfig, run_dir: Path, segments: StageResult) -> StageKey:
    return base_model.prepare_model_key(cfg, run_dir, segments, module=__name__)


def prepare_model_stage(cfg: RunConfig, run_dir: Path, segments: StageResult) -> StageResult:
    """The base model the run starts from."""
    texts = partial(training_texts, segments.path("segments"))
    return run_stage(
        prepare_model_key(cfg, run_dir, segments), lambda out: base_model.prepare_base_model(cfg, texts, out)
    )


prepare_model_task = stage_task(prepare_model_stage, prepare_model_key)
