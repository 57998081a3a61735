"""Synthetic negatives for sequence-level CPO, on token ids ("Sequence-level Large Language Model Training with
Contrastive Preference Optimization", anonymous ACL submission, section 4.2). How many of each kind an example
gets is models/sequence/settings.py's NegativeMix.

A completion is the list of token ids the model must produce after the prompt, EOS included (the trainer's
`alma` convention: completion_text(text) + [eos]); its "content" is everything before that final EOS.

    BN  batch negatives:          other rows' ground-truth completions of the same batch
    MN  meanfield negatives:      a share of the content positions resampled, each independently, from the
                                  model's next-token distribution given the ground-truth prefix
    TN  truncation negatives:     a strict prefix of the content, then EOS
    AN  autoregressive negatives: top-k samples of the reference model, generated offline by the generation
                                  stage (CANDIDATES Parquet files), read here and tokenised like the ground truth

Every sampler takes its own random.Random / torch.Generator, so a draw is a pure function of its seed.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

import torch

from alma_r.data.io import read_rows
from alma_r.data.schemas import CANDIDATES
from alma_r.models.sequence.settings import NegativeMix
from alma_r.models.train.batching import collate


def _content(completion: list[int], eos_id: int) -> list[int]:
    return completion[:-1] if completion and completion[-1] == eos_id else list(completion)


def _pick(pool: list, n: int, rng: random.Random) -> list:
    """n items of pool: distinct when the pool has n or more, else drawn with replacement."""
    return rng.sample(pool, n) if len(pool) >= n else rng.choices(pool, k=n)


# ----------------------------------------------------------------------------------------------------- BN


def batch_negatives(completions: list[list[int]], n: int, rng: random.Random) -> list[list[list[int]]]:
    """For row i, n completions of other rows j != i (never row i's own, by index). Rows whose text equals
    row i's are used only when no row with another text exists (then the negative ties with the ground
    truth); distinct rows when there are n or more candidates, else drawn with replacement."""
    if n == 0:
        return [[] for _ in completions]
    if len(completions) < 2:
        raise ValueError(f"batch negatives need at least 2 rows in the batch, got {len(completions)}")
    out = []
    for i, own in enumerate(completions):
        others = [j for j in range(len(completions)) if j != i]
        pool = [j for j in others if completions[j] != own] or others
        out.append([list(completions[j]) for j in _pick(pool, n, rng)])
    return out


# ----------------------------------------------------------------------------------------------------- MN


def meanfield_positions(n_content: int, share: float) -> int:
    """How many content positions an MN negative changes: round-half-up(share * n), at least 1 so that
    the negative always differs from the ground truth, at most n. (Python's round() would send 0.5 to 0.)"""
    if n_content == 0:
        return 0
    return min(n_content, max(1, math.floor(share * n_content + 0.5)))


@torch.no_grad()
def next_token_logits(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """One forward pass on prompt + ground-truth completion: for each row, (L, V) float32 logits of the
    distribution of completion token t given the prompt and completion tokens < t."""
    examples = [{"chosen_prompt_ids": p, "chosen_ids": c} for p, c in zip(prompts, completions, strict=True)]
    batch = collate(examples, pad_id, with_rejected=False)
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # (R, T, H)
    logits = model.get_output_embeddings()(hidden[batch.rows, batch.positions]).float().cpu()  # (N, V)
    return list(logits.split([len(c) for c in completions]))  # collate emits each row's tokens in order


def meanfield_negatives(
    model,
    prompts: list[list[int]],
    completions: list[list[int]],
    n: int,
    share: float,
    generator: torch.Generator,
    eos_id: int,
    pad_id: int,
    forbidden_ids: set[int] = frozenset(),
) -> list[list[list[int]]]:
    """n MN negatives per row. Each picks meanfield_positions(content length, share) content positions
    uniformly without replacement and replaces each token, independently, by a draw from the model's
    next-token distribution at that position given the ground-truth prefix, renormalised WITHOUT the
    original token (so every picked position really changes: exactly that many positions differ) and
    without `forbidden_ids` (pass the special tokens: an EOS or pad in the middle would not be a sequence
    of the same length). The final EOS and every other position are kept. One forward pass for the batch."""
    if n == 0:
        return [[] for _ in completions]
    logits = next_token_logits(model, prompts, completions, pad_id)
    out = []
    for row, (completion, row_logits) in enumerate(zip(completions, logits, strict=True)):
        content = _content(completion, eos_id)
        if not content:
            raise ValueError(f"row {row}: a completion without content tokens has no meanfield negative")
        masked = row_logits[: len(content)].clone()  # (Lc, V)
        masked[:, sorted(forbidden_ids | {eos_id})] = float("-inf")
        masked[torch.arange(len(content)), torch.tensor(content)] = float("-inf")
        probs = masked.softmax(-1)  # (Lc, V): the original token has probability 0
        m = meanfield_positions(len(content), share)
        negatives = []
        for _ in range(n):
            positions = torch.randperm(len(content), generator=generator)[:m]
            tokens = torch.multinomial(probs[positions], 1, generator=generator).squeeze(-1)
            negative = list(completion)
            for pos, tok in zip(positions.tolist(), tokens.tolist(), strict=True):
                negative[pos] = tok
            negatives.append(negative)
        out.append(negatives)
    return out


# ----------------------------------------------------------------------------------------------------- TN


def truncation_negatives(
    completions: list[list[int]], n: int, eos_id: int, rng: random.Random
) -> list[list[list[int]]]:
    """n TN negatives per row: content[:c] + [EOS] with c drawn uniformly from 0..len(content)-1 (a strict
    prefix, possibly empty), distinct cut points while the content is long enough, else with replacement."""
    out = []
    for row, completion in enumerate(completions):
        content = _content(completion, eos_id)
        if n and not content:
            raise ValueError(f"row {row}: a completion without content tokens has no strict prefix")
        out.append([content[:cut] + [eos_id] for cut in _pick(range(len(content)), n, rng)] if n else [])
    return out


# ----------------------------------------------------------------------------------------------------- AN


def read_autoregressive_samples(paths: list[Path]) -> dict[str, list[str]]:
    """segment_id -> sampled texts, from the generation stage's CANDIDATES files (one file per system;
    a system with n samples writes n files, <name>-1 .. <name>-n). Read through the schema check."""
    samples: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for row in read_rows(Path(path), CANDIDATES):
            samples[row["segment_id"]].append(row["hypothesis"])
    return dict(samples)


def autoregressive_negatives(
    completions: list[list[int]], samples: list[list[list[int]]], n: int, rng: random.Random
) -> list[list[list[int]]]:
    """n AN negatives per row from that row's tokenised samples. Samples equal to the ground truth are
    skipped unless nothing else is left (a good model can reproduce it); distinct samples when enough."""
    out = []
    for row, (completion, row_samples) in enumerate(zip(completions, samples, strict=True)):
        if n and not row_samples:
            raise ValueError(f"row {row}: no autoregressive samples for this example")
        pool = [s for s in row_samples if s != completion] or row_samples
        out.append([list(s) for s in _pick(pool, n, rng)] if n else [])
    return out


# ---------------------------------------------------------------------------------------------------- mix


def draw_negatives(
    mix: NegativeMix,
    prompts: list[list[int]],
    completions: list[list[int]],
    seed: int,
    eos_id: int,
    pad_id: int,
    model=None,
    forbidden_ids: set[int] = frozenset(),
    samples: list[list[list[int]]] | None = None,
) -> list[list[list[int]]]:
    """Per row, mix.total negatives in the column order of mix.kinds(): BN, MN, TN, AN. `model` (for MN)
    and `samples` (for AN) are needed only when those counts are above 0."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    parts = [batch_negatives(completions, mix.batch, rng)]
    if mix.meanfield:
        if model is None:
            raise ValueError("meanfield negatives need the model")
        parts.append(
            meanfield_negatives(
                model, prompts, completions, mix.meanfield, mix.meanfield_share, generator, eos_id, pad_id,
                forbidden_ids,
            )
        )  # fmt: skip
    parts.append(truncation_negatives(completions, mix.truncation, eos_id, rng))
    if mix.autoregressive:
        if samples is None:
            raise ValueError("autoregressive negatives need the samples of the generation stage")
        parts.append(autoregressive_negatives(completions, samples, mix.autoregressive, rng))
    return [sum((part[row] for part in parts), []) for row in range(len(completions))]
