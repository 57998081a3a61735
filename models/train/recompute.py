"""Selective activation recompute: keep each decoder layer's matmul and attention outputs, recompute the rest.

A decoder layer's backward needs, besides the matmul inputs of its trained weights, the inputs of its
elementwise ops: the float32 copies inside RMSNorm, the rotary inputs, SiLU's input and output and the gate
product. Under `torch.utils.checkpoint` with a selective policy (PyTorch's `create_selective_checkpoint_contexts`)
only the outputs of the matmuls and of attention are stored; in backward the layer's forward is replayed and
every other op recomputed from them, which costs elementwise work only, never a matmul. The values are the same
ops on the same inputs, so losses and gradients are bitwise those of a run without it.

Measured (docs/benchmarks.md): with full fine-tuning, where every matmul input is kept anyway for its weight
gradient, it lowers the activation memory at the same speed; with LoRA the frozen matmuls keep no inputs, so
the layer stores about as much either way and the replay only costs time: `auto` turns it on for full
fine-tuning of models from hidden size AUTO_MIN_HIDDEN up.
"""

from __future__ import annotations

import functools

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}


def _kept(op) -> bool:
    """A matmul or an attention kernel (SDPA's, flash-attn's): outputs that are costly to recompute."""
    name = op.name() if hasattr(op, "name") else str(op)  # e.g. "aten::mm", "flash_attn::_flash_attn_forward"
    base = name.split("::")[-1].split(".")[0]
    return base in _MATMULS or "attention" in base or "attn" in base


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if _kept(op) else CheckpointPolicy.PREFER_RECOMPUTE


def enable_recompute(model, mode: str) -> None:
    """Checkpoint every decoder layer of a transformers model through its own gradient-checkpointing hook:
    "layers" recomputes each whole layer, "elementwise" with the selective policy above, "off" nothing.
    Non-reentrant, so that DDP/FSDP and frozen inputs work as without it."""
    if mode == "off":
        return
    kwargs = {"use_reentrant": False}
    if mode == "elementwise":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _policy)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# `auto` recomputes from this hidden size up: at 512 (docs/benchmarks.md's 58M model) the replay cost no speed,
# while in models of hidden size 64-128 its per-op overhead nearly doubled a step whose activations are tiny.
AUTO_MIN_HIDDEN = 512


def recompute_mode(setting: str, finetune: str, gradient_checkpointing: bool, hidden_size: int) -> str:
    """What a run does: "layers" (whole-layer gradient checkpointing), "elementwise" or "off"."""
    if gradient_checkpointing:
        return "layers"
    if setting == "auto":
        return "elementwise" if finetune == "full" and hidden_size >= AUTO_MIN_HIDDEN else "off"
    return setting
