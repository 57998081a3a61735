"""Learning-rate schedules by name: the four that ALMA-R's and TRL's trainers offer, from transformers."""

from __future__ import annotations


def build_scheduler(name: str, optimizer, warmup: int, total: int):
    """The schedule `name` over `total` optimizer steps, `warmup` of them warming up (inverse_sqrt: at least 1)."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_inverse_sqrt_schedule,
        get_linear_schedule_with_warmup,
    )

    if name == "inverse_sqrt":
        return get_inverse_sqrt_schedule(optimizer, num_warmup_steps=max(warmup, 1))
    if name == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total)
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise ValueError(f"unknown lr_scheduler '{name}'")
