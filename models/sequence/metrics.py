"""The generation-quality metrics of "Sequence-level Large Language Model Training with Contrastive Preference
Optimization" (anonymous ACL submission, section 4.4, eq. 9 and 10) under a larger scoring model P-hat.

Approximate reverse-KL (eq. 9), E_x KL(Q(.|x) || P-hat(.|x)). The paper writes it as a sum over the set Y of
generated continuations, (1/|X|) sum_x sum_{y in Y} Q(y|x) log(Q(y|x) / P-hat(y|x)). We estimate the same
quantity by Monte Carlo: draw y ~ Q(.|x) (ancestral sampling, temperature 1, no top-k / top-p, so that the
samples follow Q itself), then

    KL ~= (1/|X|) sum_x (1/n_x) sum_{i <= n_x} [ log Q(y_i|x) - log P-hat(y_i|x) ]

which is unbiased, and needs no Q(y|x) weight (the weight is in the sampling: the instability the paper
reports for a vanishing Q(y|x) does not arise). `reverse_kl_plugin` is the paper's literal sum over the
distinct sampled y, weighted by Q(y|x): it equals the true KL when the samples cover the support and is
below it otherwise. A sample that reaches max_new_tokens without EOS is scored as the prefix it is.

Length-normalised NLL (eq. 10): (1/|X|) sum_x (1/n_x) sum_y -log P-hat(y|x) / |y|, |y| = completion tokens
scored, EOS included.

Sequences are token ids: prompt ids + completion ids (EOS included when generated), scored exactly as the
trainers score them (collate + CompletionLogps).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from alma_r.models.generate.hf_backend import _left_pad
from alma_r.models.train.batching import collate
from alma_r.models.train.logprobs import CompletionLogps


@torch.no_grad()
def sequence_logps(
    model, prompts: list[list[int]], completions: list[list[int]], pad_id: int, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float32 log P(completion | prompt) summed over completion tokens, and (N,) token counts."""
    model.eval()
    wrapper = CompletionLogps(model)
    device = next(model.parameters()).device
    logps, counts = [], []
    for start in range(0, len(prompts), batch_size):
        examples = [
            {"chosen_prompt_ids": p, "chosen_ids": c}
            for p, c in zip(
                prompts[start : start + batch_size], completions[start : start + batch_size], strict=True
            )
        ]
        lp, n = wrapper(collate(examples, pad_id, with_rejected=False).to(device))
        logps.append(lp.cpu())
        counts.append(n.cpu())
    return torch.cat(logps), torch.cat(counts)


@torch.no_grad()
def generate_completion_ids(
    model,
    prompts: list[list[int]],
    eos_id: int,
    pad_id: int,
    do_sample: bool,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 256,
) -> list[list[int]]:
    """One completion per prompt as token ids, cut after the first EOS (kept): greedy, or a sample from the
    model's own distribution (temperature 1, top_k 0, top_p 1: nothing truncated, as eq. 9 needs)."""
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out: list[list[int]] = []
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id, eos_token_id=eos_id
    )
    if do_sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        input_ids, attention_mask = _left_pad(chunk, pad_id)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
        )[:, input_ids.shape[1] :].tolist()
        for ids in generated:
            out.append(ids[: ids.index(eos_id) + 1] if eos_id in ids else ids)
    return out


def _by_prompt(values: torch.Tensor, groups: list) -> float:
    """Mean over prompts of the mean over each prompt's samples."""
    per: dict = defaultdict(list)
    for g, v in zip(groups, values.tolist(), strict=True):
        per[g].append(v)
    return sum(sum(v) / len(v) for v in per.values()) / max(len(per), 1)


def reverse_kl(q_logps: torch.Tensor, p_logps: torch.Tensor, groups: list | None = None) -> float:
    """Eq. 9 by Monte Carlo over samples y ~ Q: mean_x mean_{y|x} [log Q(y|x) - log P-hat(y|x)].
    groups[i] names the prompt of sample i (default: one sample per prompt)."""
    groups = list(range(len(q_logps))) if groups is None else groups
    return _by_prompt(q_logps.double() - p_logps.double(), groups)


def reverse_kl_plugin(q_logps: torch.Tensor, p_logps: torch.Tensor, sequences: list, groups: list) -> float:
    """Eq. 9 as the paper writes it: mean_x sum over the DISTINCT sampled y of Q(y|x) log(Q(y|x)/P-hat(y|x))."""
    per: dict = defaultdict(dict)
    for g, seq, q, p in zip(
        groups, sequences, q_logps.double().tolist(), p_logps.double().tolist(), strict=True
    ):
        per[g][tuple(seq)] = (q, p)
    total = sum(sum(math.exp(q) * (q - p) for q, p in ys.values()) for ys in per.values())
    return total / max(len(per), 1)


def length_normalised_nll(p_logps: torch.Tensor, n_tokens: torch.Tensor, groups: list | None = None) -> float:
    """Eq. 10: mean_x mean_{y|x} -log P-hat(y|x) / |y| (|y| = scored tokens, EOS included; at least 1)."""
    groups = list(range(len(p_logps))) if groups is None else groups
    return _by_prompt(-p_logps.double() / n_tokens.clamp(min=1).double(), groups)
