"""The scorer stage of the sequence-cpo flow: P-hat, the larger model the evaluation scores outputs under
("Sequence-level Large Language Model Training with Contrastive Preference Optimization", anonymous ACL
submission, section 4.4, eq. 9 and 10: a more capable model approximates the true language distribution).
Either the configured model folder, or a tiny LLaMA larger than the policy trained longer with MLE."""

from __future__ import annotations

from pathlib import Path

from alma_r.config import config_base_dir, resolve_path
from alma_r.config.sequence import SequenceRunConfig
from alma_r.models.loading import load_tokenizer
from alma_r.models.tiny import build_tiny_model
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.sequence.shared import split_rows, train_mle


def run_scorer(
    cfg: SequenceRunConfig, instructions: StageResult, base: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    """A tiny LLaMA larger than the policy, with the policy's tokenizer, trained with MLE on the training
    split for scorer.max_steps."""
    s = cfg.scorer
    tokenizer = load_tokenizer(base.outputs["model"], cfg.model.trust_remote_code)
    architecture = {**s.tiny.model_dump(), "vocab_size": len(tokenizer)}
    # seed + 1: not the policy's initialisation
    start = build_tiny_model([], out_dir / "init", **architecture, seed=cfg.run.seed + 1, tokenizer=tokenizer)
    rows = split_rows(instructions, "train")
    return train_mle(cfg, s, str(start), out_dir, "scoring model (MLE)", rows)


def scorer_key(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult
) -> StageKey:
    trained = cfg.scorer.model == "train"
    key = stage_key(
        "scorer",
        cfg.section_hash("scorer", "model") if trained else cfg.section_hash("scorer"),
        [instructions, base] if trained else [],
        extra=cfg.run.seed if trained else None,
        module=__name__,
    )
    return StageKey("scorer", Path(run_dir) / "scorer", key)


def scorer_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult
) -> StageResult:
    """P-hat of eq. 9 / eq. 10: the configured model folder, or a larger tiny model trained longer."""
    where = scorer_key(cfg, run_dir, instructions, base)
    if cfg.scorer.model != "train":
        folder = resolve_path(cfg.scorer.model, config_base_dir(cfg))
        if not folder.is_dir():
            raise FileNotFoundError(f"scorer.model: {folder} is not a model folder")
        return run_stage(where, lambda out: ({"model": folder}, {"trained": False}))
    return run_stage(where, lambda out: run_scorer(cfg, instructions, base, out), resumable=True)


scorer_task = stage_task(scorer_stage, scorer_key, gpu=True)
