"""Per-sequence completion log-probs without materialising [tokens x vocab] logits for the batch.

The decoder runs once over the batch; the lm_head and a float32 log-softmax are applied only at the positions
that predict completion tokens, in chunks, each recomputed in backward (activation checkpointing), so that at
most one chunk of logits is alive at a time.
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
        pieces = []
        for start in range(0, states.shape[0], self.chunk_size):
            h, t = states[start : start + self.chunk_size], batch.targets[start : start + self.chunk_size]
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
            else:
                pieces.append(_chunk_logps(lm_head, h, t))
        token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
        sums = torch.zeros(batch.n_seqs, dtype=torch.float32, device=states.device).index_add(
            0, batch.seq, token_logps
        )
        counts = torch.bincount(batch.seq, minlength=batch.n_seqs)
        return sums, counts


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
