"""Translation with transformers `generate`, ALMA post-processing: length-sorted batches with left padding
(`generate_translations`), or each prompt's samples in one call of their own, each drawn from its own seeded
generator (`sample_translations`).

A prompt longer than the limit is never cut: it gets no output (None) and the caller counts it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
    on_batch: Callable[[list[int], list[str]], None] | None = None,
) -> list[str | None]:
    """One post-processed translation per prompt, or None where the prompt exceeds `max_prompt_tokens`.

    `on_batch(indices, translations)` is called after each batch, with the prompts' places in `prompts`: a
    caller can keep them before the next batch (and a crash) comes."""
    keep = None if on_batch is None else (lambda idx, texts: on_batch(idx, [t[0] for t in texts]))
    outs = _generate(model, tokenizer, prompts, decoding, batch_size, max_prompt_tokens, seed, desc, keep, 1)
    return [None if o is None else o[0] for o in outs]


def generate_n_best(
    model,
    tokenizer,
    prompts: list[str],
    decoding: Decoding,
    n: int,
    batch_size: int,
    max_prompt_tokens: int,
    seed: int = 0,
    desc: str = "generate candidates",
) -> list[list[str] | None]:
    """Beam search's `n` best translations per prompt, best first (None over the limit; num_beams is raised to n
    when lower): the candidates of quality-aware decoding (QE reranking, MBR). Samples: sample_translations,
    whose rows do not depend on their batch neighbours."""
    if decoding.do_sample:
        raise ValueError("generate_n_best is beam search's n best; sample_translations draws samples")
    decoding = dataclasses.replace(decoding, num_beams=max(decoding.num_beams, n))
    return _generate(model, tokenizer, prompts, decoding, batch_size, max_prompt_tokens, seed, desc, None, n)


def _generate(model, tokenizer, prompts, decoding, batch_size, max_prompt_tokens, seed, desc, on_batch, n):
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    todo = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_tokens]
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows up at once.
    todo.sort(key=lambda i: -len(encoded[i]))
    outputs: list[list[str] | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    kwargs = dict(
        max_new_tokens=decoding.max_new_tokens,
        num_beams=decoding.num_beams,
        do_sample=decoding.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_return_sequences=n,
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
        flat = [postprocess(t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        texts = [flat[row * n : (row + 1) * n] for row in range(len(idx))]  # generate's rows: prompt-major
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = text
        if on_batch is not None:
            on_batch(idx, texts)
        progress.report(start + len(idx), len(todo), desc, unit="sentence")
    return outputs


class SeededRowSampling:
    """A transformers logits processor: draws each row's next token from the row's own seeded generator and
    leaves only that token, which the greedy step that follows takes.

    transformers samples every row of a batch from one global generator (`torch.multinomial(probs, 1)` in
    `GenerationMixin._sample`, which takes no generator), so a row's sample would depend on the rows beside it.
    The distribution is the one `do_sample` draws from: temperature, then top-k, then top-p, as
    `GenerationMixin._get_logits_processor` orders them, then softmax.
    """

    def __init__(self, seeds: list[int], decoding: Decoding, device: torch.device):
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.warpers = LogitsProcessorList()
        if decoding.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(decoding.temperature))
        if decoding.top_k != 0:
            self.warpers.append(TopKLogitsWarper(top_k=decoding.top_k, min_tokens_to_keep=1))
        if decoding.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=decoding.top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        tokens = torch.cat(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators, strict=True)]
        )
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens[:, None], 0.0)


@torch.inference_mode()
def sample_translations(
    model,
    tokenizer,
    prompts: list[str],
    seeds: list[list[int]],
    decoding: Decoding,
    max_prompt_tokens: int,
    desc: str = "generate",
    on_prompt: Callable[[int, list[str]], None] | None = None,
) -> list[list[str] | None]:
    """Per prompt: one post-processed sample per seed in `seeds[i]`, or None where the prompt exceeds
    `max_prompt_tokens`.

    A prompt's samples are generated in one call of their own (no padding, no other prompt beside them), each
    from its own seed: a sample depends on its prompt and seed only, not on which prompts are generated with
    it, in which order. Beam sampling (num_beams > 1) has no per-row draw: one seeded call per sample.
    `on_prompt(i, samples)` is called after each prompt.
    """
    from transformers import LogitsProcessorList

    if not decoding.do_sample:
        raise ValueError("sample_translations samples: a decoding with do_sample")
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    todo = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_tokens]
    outputs: list[list[str] | None] = [None] * len(prompts)
    kwargs = dict(
        max_new_tokens=decoding.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    progress.report(0, len(todo), desc, unit="sentence")  # the rate counts from here
    for done, i in enumerate(todo, start=1):
        prompt = torch.tensor([encoded[i]], dtype=torch.long, device=device)
        if decoding.num_beams == 1:
            rows = prompt.repeat(len(seeds[i]), 1)
            out = model.generate(
                input_ids=rows,
                attention_mask=torch.ones_like(rows),
                do_sample=False,  # the draw is SeededRowSampling's; the greedy step takes its token
                num_beams=1,
                logits_processor=LogitsProcessorList([SeededRowSampling(seeds[i], decoding, device)]),
                **kwargs,
            )
        else:
            out = []
            for seed in seeds[i]:
                torch.manual_seed(seed)
                out += model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=True,
                    num_beams=decoding.num_beams,
                    temperature=decoding.temperature,
                    top_p=decoding.top_p,
                    top_k=decoding.top_k,
                    **kwargs,
                )
        new_tokens = [row[prompt.shape[1] :] for row in out]
        outputs[i] = [postprocess(t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if on_prompt is not None:
            on_prompt(i, outputs[i])
        progress.report(done, len(todo), desc, unit="sentence")
    return outputs
