"""The accelerate set-up of the CPO recipe: one Accelerator whose every behaviour is set here, not by the
environment (mixed precision, accumulation), and a notice when sharding was asked for where accelerate cannot."""

from __future__ import annotations

import os

import torch


def make_accelerator(gradient_accumulation_steps: int):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    # Mixed precision is ours to apply (bf16 autocast around the decoder, float32 log-softmax): accelerate's
    # would also come from an environment variable or a config file the user forgot about. The accumulation
    # plugin is explicit for the same reason (ACCELERATE_GRADIENT_ACCUMULATION_STEPS), and there is no
    # dataloader whose end should force a sync.
    accumulation = GradientAccumulationPlugin(
        num_steps=gradient_accumulation_steps, sync_with_dataloader=False
    )
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="no", gradient_accumulation_plugin=accumulation
    )
    asked = [k for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED") if os.environ.get(k) == "true"]
    if asked and accelerator.is_main_process and not is_sharded(accelerator):
        # accelerate runs DDP instead on CPUs, silently
        print(f"[train] {asked[0]} is set, but accelerate shards only on GPUs: this run is not sharded")
    return accelerator


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
