"""The mle stage of the sequence-cpo flow: next-token prediction on prompt + response of the training split,
every weight trained. Its model is the reference pi_ref of sequence-level CPO and the alpha = 1 end of the
WiSE-FT grid ("Sequence-level Large Language Model Training with Contrastive Preference Optimization", anonymous
ACL submission, section 5, "Training details": the MLE models)."""

from __future__ import annotations

from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.sequence.shared import split_rows, train_mle


def run_mle(
    cfg: SequenceRunConfig, instructions: StageResult, base: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    rows = split_rows(instructions, "train")
    return train_mle(cfg, cfg.mle, base.outputs["model"], out_dir, "MLE", rows)


def mle_key(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult) -> StageKey:
    key = stage_key(
        "mle", cfg.section_hash("mle", "model"), [instructions, base], extra=cfg.run.seed, module=__name__
    )
    return StageKey("mle", Path(run_dir) / "mle", key)


def mle_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult
) -> StageResult:
    """The MLE model (pi_ref of CPO, alpha = 1 of WiSE-FT); resumes from its last checkpoint."""
    return run_stage(
        mle_key(cfg, run_dir, instructions, base),
        lambda out: run_mle(cfg, instructions, base, out),
        resumable=True,
    )


mle_task = stage_task(mle_stage, mle_key, gpu=True)
