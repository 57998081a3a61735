"""Per-sequence completion log-probs without materialising [batch x tokens x vocab] logits.

The decoder runs once; the lm_head and a float32 log-softmax are applied only at completion positions, in
chunks, each recomputed in backward (activation checkpointing) so that at most one chunk of logits lives at once.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (N_chunk, V), float32 even when the model runs in bf16
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N_chunk,)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                     chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log pi(token) over completion tokens, per row, and the number of such tokens.

    input_ids, attention_mask, completion_mask: (B, T), right-padded; completion_mask is 1 on completion tokens
    (EOS included), 0 on prompt and padding. Returns (logps (B,) float32, n_tokens (B,) long).
    """
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    predicts = completion_mask[:, 1:].bool()  # (B, T-1): position t predicts token t+1
    states = hidden[:, :-1][predicts]  # (N, H)
    targets = input_ids[:, 1:][predicts]  # (N,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(predicts)[predicts]
    token_logps = []
    for start in range(0, states.shape[0], chunk_size):
        h, t = states[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            token_logps.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
        else:
            token_logps.append(_chunk_logps(lm_head, h, t))
    flat = torch.cat(token_logps) if token_logps else states.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device).index_add(0, rows, flat)
    return sums, predicts.sum(dim=1)
