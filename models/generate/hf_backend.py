"""Batch translation with transformers `generate`: length-sorted batches, left padding, ALMA post-processing.

A prompt longer than the limit is never cut: it gets no output (None) and the caller counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alma_r.models import progress
from alma_r.models.prompts import postprocess


@dataclass(frozen=True)
class Decoding:
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # transformers samples from the 50 most likely tokens unless told otherwise (GenerationConfig.top_k = 50),
    # which is also the paper's setting for autoregressive negatives; 0 samples from the full distribution.
    top_k: int = 50
    max_new_tokens: int = 64


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


@torch.inference_mode()
def generate_translations(
    model,
    tokenizer,
    prompts: list[str],
    decoding: Decoding,
    batch_size: int,
    max_prompt_tokens: int,
    seed: int = 0,
    desc: str = "generate",
) -> list[str | None]:
    """One post-processed translation per prompt, or None where the prompt exceeds `max_prompt_tokens`."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    todo = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_tokens]
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows up at once.
    todo.sort(key=lambda i: -len(encoded[i]))
    outputs: list[str | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    kwargs = dict(
        max_new_tokens=decoding.max_new_tokens,
        num_beams=decoding.num_beams,
        do_sample=decoding.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    progress.report(0, len(todo), desc, unit="sentence")  # the rate counts from here
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        input_ids, attention_mask = _left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
        )
        new_tokens = out[:, input_ids.shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            outputs[i] = postprocess(text)
        progress.report(start + len(idx), len(todo), desc, unit="sentence")
    return outputs
