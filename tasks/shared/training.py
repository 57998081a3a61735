"""What the training stages of both flows share: the run-wide values a recipe takes beside its settings, and a
recipe's summary as stage counts."""

from __future__ import annotations


def run_wide_settings(cfg) -> dict:
    """What every recipe (CPORecipe, SequenceCPORecipe) takes beside its settings: the run's seed, the model's
    dtype and trust_remote_code. `cfg` is either flow's config: both have the same `run` and `model` sections."""
    return {"seed": cfg.run.seed, "dtype": cfg.model.dtype, "trust_remote_code": cfg.model.trust_remote_code}


def summary_counts(summary: dict, *names: str) -> dict:
    """Stage counts from CPORecipe.summary(): the values of `names`, then the pairs skipped, by reason, as
    `skipped_<reason>`."""
    return {name: summary[name] for name in names} | {
        f"skipped_{k}": v for k, v in summary["skipped"].items()
    }
