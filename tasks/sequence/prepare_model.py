"""The prepare_model stage of the sequence-cpo flow: the base model, a tiny LLaMA whose tokenizer is built from
the training split (model.base: tiny), or model.base handed through as it is (tasks/shared/base_model.py, shared
with the build-alma-r flow)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage
from alma_r.tasks.sequence.shared import split_rows
from alma_r.tasks.shared import base_model


def training_texts(instructions: StageResult) -> list[str]:
    """Prompts (so that the template is cheap) and responses of the training split only: test instructions
    must not leak into the vocabulary."""
    rows = split_rows(instructions, "train")
    return [r["prompt"] for r in rows] + [r["response"] for r in rows]


def prepare_model_key(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult) -> StageKey:
    return base_model.prepare_model_key(cfg, run_dir, instructions, module=__name__)


def prepare_model_stage(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult) -> StageResult:
    """The base model: a tiny LLaMA built from the training split, or model.base handed through."""
    texts = partial(training_texts, instructions)
    return run_stage(
        prepare_model_key(cfg, run_dir, instructions),
        lambda out: base_model.prepare_base_model(cfg, texts, out),
    )


prepare_model_task = stage_task(prepare_model_stage, prepare_model_key)
