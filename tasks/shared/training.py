"""What the training stages of both flows share: the run-wide values a recipe takes beside its settings, and a
recipe's summary of the pairs it skipped as stage counts."""

from __future__ import annotations


def run_wide_settings(cfg) -> dict:
    """What every recipe (CPORecipe, SequenceCPORecipe) takes beside its settings: the run's seed, the model's
    dtype and trust_remote_code. `cfg` is either flow's config: both have the same `run` and `model` sections."""
    return {"seed": cfg.run.seed, "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}


def skipped_counts(summary: dict) -> dict:
    """CPORecipe.summary()'s pairs skipped, by reason, as stage counts `skipped_<reason>`."""
    return {f"skipped_{k}": v for k, v in summary["skipped"].items()}
