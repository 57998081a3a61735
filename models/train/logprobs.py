"""Per-sequence completion log-probs without materialising [tokens x vocab] logits for the batch.

The decoder runs once over the batch; the lm_head and a float32 log-softmax are applied only at the positions
that predict completion tokens, a chunk of positions at a time, so that at most one chunk of logits is alive.

A plain bias-free Linear head (LLaMA's, Mistral's, Qwen's) takes `TokenLogps`, which writes the log-softmax's
gradient itself: d log p(t) / d logits = onehot(t) - softmax, formed in place over the chunk's float32 logits.
A frozen head (LoRA) then needs nothing of the logits after its forward: the gradient with respect to the hidden
state is computed there, one matmul, and backward only scales it. A trained head recomputes the chunk's logits
in backward for its weight gradient. Any other head (a LoRA-adapted or sharded one, a head with a bias) is
called as a module, each chunk recomputed in backward by activation checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class PackedBatch:
    """A batch laid out for one decoder pass, and where each completion token is predicted from.

    input_ids (R, T) and position_ids (R, T); attention_mask (R, T) for plain causal rows, or (R, 1, T, T) for
    rows that pack several sequences (the shared-prompt layout). For the N completion tokens of the batch:
    rows/positions (N,) locate the hidden state that predicts each, targets (N,) are the token ids, seq (N,)
    the index of the sequence (0..n_seqs-1) it belongs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    n_seqs: int

    def to(self, device) -> PackedBatch:
        return PackedBatch(
            **{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        )


def _chunk_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (N_chunk, V): float32 even when the model runs in bf16
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N_chunk,)


def _softmax_minus_onehot(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits)[target] (N,) float32, (softmax(logits) - onehot(target)) * scale (N, V)), the latter
    being -d log p / d logits (scaled per row when `scale` (N, 1) is given), formed in float32 and returned in
    `logits`' own buffer, which it overwrites: the passes a log_softmax, its gather and their backward would each
    make over [N x V] are one cast, one exp and one division here, and a chunk needs one float32 buffer at most."""
    p = logits if logits.dtype == torch.float32 else logits.float()
    target_logit = p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    peak = p.amax(-1, keepdim=True)
    p.sub_(peak).exp_()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    token_logps = target_logit - peak.squeeze(-1) - total.squeeze(-1).log()
    p.scatter_add_(-1, targets.unsqueeze(-1), p.new_full((targets.shape[0], 1), -1.0))
    if scale is not None:
        p.mul_(scale)
    if p is not logits:
        logits.copy_(p)  # into the matmuls' dtype
    return token_logps, logits


class TokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, a chunk of rows at a time (see the module docstring).

    `compute_dtype` is the matmuls' dtype (autocast's when it is on, as the head module would compute); the
    log-softmax is float32 always. Returns float32 (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, compute_dtype: torch.dtype):
        w = weight.to(compute_dtype)
        ctx.frozen_head = frozen = not ctx.needs_input_grad[1]
        ctx.chunk_size, ctx.compute_dtype, ctx.hidden_dtype = chunk_size, compute_dtype, hidden.dtype
        unit = None  # frozen head: d log p / d hidden = -(softmax - onehot) @ W, computed here, once
        if frozen and ctx.needs_input_grad[0]:
            unit = hidden.new_empty(hidden.shape, dtype=compute_dtype)
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logps, g = _softmax_minus_onehot(hidden[start:end].to(compute_dtype) @ w.t(), targets[start:end])
            out[start:end] = logps
            if unit is not None:
                torch.matmul(g, w, out=unit[start:end])
                unit[start:end].neg_()
            del g
        if frozen:
            ctx.save_for_backward(unit)
        else:
            ctx.save_for_backward(hidden, weight, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out.unsqueeze(-1)
        if ctx.frozen_head:
            (unit,) = ctx.saved_tensors
            grad_hidden = None if unit is None else (unit * scale).to(ctx.hidden_dtype)
            return grad_hidden, None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        dt = ctx.compute_dtype
        w = weight.to(dt)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None  # float32, the first chunk's product then each further one added in place
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end].to(dt)
            _, g = _softmax_minus_onehot(
                h @ w.t(), targets[start:end], scale[start:end].neg()
            )  # d loss / d logits
            if grad_hidden is not None:
                grad_hidden[start:end] = g @ w
            if grad_weight is None:
                grad_weight = (g.t() @ h).float()
            elif dt == torch.float32:
                torch.addmm(grad_weight, g.t(), h, out=grad_weight)
            else:  # the matmul in the compute dtype, accumulated in float32
                grad_weight += g.t() @ h
            del g
        if grad_weight is None:  # no rows
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def plain_linear_weight(lm_head: torch.nn.Module) -> torch.Tensor | None:
    """The head's weight when the head is exactly a bias-free nn.Linear holding it whole (not a LoRA layer, not a
    ZeRO-3 or FSDP shard): only then may TokenLogps multiply by it directly."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None:
        return None
    w = lm_head.weight
    if w.dim() != 2 or w.shape != (lm_head.out_features, lm_head.in_features) or hasattr(w, "ds_id"):
        return None
    return w


ROW_BUCKET = 64


class CompletionLogps(torch.nn.Module):
    """Wraps a causal LM so that forward returns per-sequence completion log-probs.

    Being a Module, it can be handed to DDP/FSDP/DeepSpeed (accelerate.prepare): gradient sync hooks on the
    wrapper's forward, while the lm_head is still applied only where it is needed.
    """

    def __init__(self, model, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logps (n_seqs,) float32 sums over each sequence's completion tokens, n_tokens (n_seqs,))."""
        decoder = self.model.get_decoder()
        lm_head = self.model.get_output_embeddings()
        hidden = decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # (R, T, H)
        states = hidden[batch.rows, batch.positions]  # (N, H)
        token_logps = self._token_logps(lm_head, states, batch.targets)
        sums = torch.zeros(batch.n_seqs, dtype=torch.float32, device=states.device).index_add(
            0, batch.seq, token_logps
        )
        counts = torch.bincount(batch.seq, minlength=batch.n_seqs)
        return sums, counts

    def _token_logps(self, lm_head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = plain_linear_weight(lm_head)
        if weight is not None:
            device = states.device.type
            on = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if on else weight.dtype
            # Rows padded to a multiple of ROW_BUCKET, so that the last chunk takes one of a few shapes: oneDNN
            # (bfloat16 on CPUs) caches a compiled kernel per matmul shape, ~1 MB each, for the whole run.
            n, pad = states.shape[0], -states.shape[0] % ROW_BUCKET
            if pad:
                states = torch.cat([states, states.new_zeros(pad, states.shape[1])])
                targets = torch.cat([targets, targets.new_zeros(pad)])
            return TokenLogps.apply(states, weight, targets, self.chunk_size, dtype)[:n]
        pieces = []
        for start in range(0, states.shape[0], self.chunk_size):
            h, t = states[start : start + self.chunk_size], targets[start : start + self.chunk_size]
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
            else:
                pieces.append(_chunk_logps(lm_head, h, t))
        return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)


def completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain right-padded rows, one sequence per row: completion_mask (B, T) is 1 on completion tokens (EOS
    included), 0 on prompt and padding. Returns (logps (B,), n_tokens (B,))."""
    B, T = input_ids.shape
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)  # token at cols+1 is predicted at cols
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    batch = PackedBatch(
        input_ids, attention_mask, position_ids, rows, cols, input_ids[rows, cols + 1], rows, B
    )
    return CompletionLogps(model, chunk_size)(batch)
