"""The prepare_model stage of the sequence-cpo flow: the base model, a tiny LLaMA whose tokenizer is built from
the training split (model.base: tiny), or model.base handed through as it is."""

from __future__ import annotations

from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.models.tiny import build_tiny_model
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.sequence.shared import split_rows


def run_prepare_model(cfg: SequenceRunConfig, instructions: StageResult, out_dir: Path) -> tuple[dict, dict]:
    if cfg.model.base != "tiny":
        return {"model": cfg.model.base}, {"built": False}
    # The tokenizer learns from the training split only (prompts, so that the template is cheap, and
    # responses): test instructions must not leak into the vocabulary.
    rows = split_rows(instructions, "train")
    texts = [r["prompt"] for r in rows] + [r["response"] for r in rows]
    path = build_tiny_model(texts, out_dir / "model", **cfg.model.tiny.model_dump(), seed=cfg.run.seed)
    return {"model": path}, {"built": True, "tokenizer_texts": len(texts)}


def prepare_model_key(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult) -> StageKey:
    upstream = [instructions] if cfg.model.base == "tiny" else []
    key = stage_key("prepare_model", cfg.section_hash("model"), upstream, extra=cfg.run.seed, module=__name__)
    return StageKey("prepare_model", Path(run_dir) / "prepare_model", key)


def prepare_model_stage(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult) -> StageResult:
    """The base model: a tiny LLaMA built from the training split, or model.base handed through."""
    return run_stage(
        prepare_model_key(cfg, run_dir, instructions), lambda out: run_prepare_model(cfg, instructions, out)
    )


prepare_model_task = stage_task(prepare_model_stage, prepare_model_key)
