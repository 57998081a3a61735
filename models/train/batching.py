"""Token ids and decoder batches of preference pairs, shared by the CPO recipe and the sequence-level trainer.

`tokenize_pairs` turns (prompt, chosen, rejected) texts into token ids under ALMA-R's or TRL's convention and
skips, never cuts, a pair over the length limits; `collate` lays a micro-batch out for one decoder pass, either as
2B plain rows or as B packed rows that encode each prompt once for both completions.
"""

from __future__ import annotations

import torch

from alma_r.models.prompts import completion_text
from alma_r.models.train.logprobs import PackedBatch

# ------------------------------------------------------------------------------------------- tokenisation


def _trl_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """TRL's build_tokenized_answer: tokenise prompt+answer jointly, split where the prompt ends (one token
    earlier when the tokenizer merged across the boundary)."""
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, convention: str = "alma") -> dict:
    """Token ids of one pair: {chosen,rejected}_prompt_ids and {chosen,rejected}_ids (EOS included).

    alma: prompt and completion tokenised separately, no BOS, EOS appended (ALMA-R's released trainer).
    trl:  prompt+completion tokenised jointly, BOS prepended and EOS appended when missing (TRL's CPOTrainer).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if convention == "alma":
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion_text(chosen), add_special_tokens=False)["input_ids"] + [eos]
        r = tokenizer(completion_text(rejected), add_special_tokens=False)["input_ids"] + [eos]
        return {"chosen_prompt_ids": p, "chosen_ids": c, "rejected_prompt_ids": p, "rejected_ids": r}
    out = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        p, a = _trl_answer(tokenizer, prompt, completion_text(answer))
        if bos is not None and (not p or p[0] != bos):
            p = [bos, *p]
        if not a or a[-1] != eos:
            a = [*a, eos]
        out[f"{side}_prompt_ids"], out[f"{side}_ids"] = p, a
    return out


def tokenize_pairs(
    tokenizer, pairs: list[dict], max_prompt_length: int, max_length: int, convention: str = "alma"
) -> tuple[list[dict], dict[str, int]]:
    """Tokenise pairs; one whose prompt or total length exceeds the limits is skipped and counted, never cut."""
    kept, skipped = [], {"prompt_too_long": 0, "too_long": 0}
    for pair in pairs:
        ex = tokenize_pair(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"], convention)
        if max(len(ex["chosen_prompt_ids"]), len(ex["rejected_prompt_ids"])) > max_prompt_length:
            skipped["prompt_too_long"] += 1
            continue
        if max(len(ex[f"{s}_prompt_ids"]) + len(ex[f"{s}_ids"]) for s in ("chosen", "rejected")) > max_length:
            skipped["too_long"] += 1
            continue
        weight = pair.get("weight")  # select.pairs' share of the source; absent or null: 1
        kept.append(ex | {"weight": 1.0 if weight is None else float(weight)})
    return kept, skipped


# ------------------------------------------------------------------------------------------------ batching


def _mask_value(dtype: torch.dtype, attn_implementation: str):
    """SDPA takes a boolean mask (True = attend); eager attention adds a float mask to the scores."""
    if attn_implementation == "eager":
        return torch.finfo(dtype).min
    return None


def pack_rows(lengths: list[int], capacity: int) -> list[tuple[int, int]]:
    """(row, offset) of each sequence when sequences are packed into rows of `capacity` tokens, first-fit by
    decreasing length (a sequence longer than the capacity is not allowed). Deterministic: ties keep order."""
    free: list[int] = []  # tokens left in each row
    places: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        if lengths[i] > capacity:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a row of {capacity}")
        row = next((r for r, left in enumerate(free) if left >= lengths[i]), len(free))
        if row == len(free):
            free.append(capacity)
        places[i] = (row, capacity - free[row])
        free[row] -= lengths[i]
    return places


def collate(
    examples: list[dict],
    pad_id: int,
    with_rejected: bool = True,
    shared_prompt: bool = False,
    mask_dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """Lay a micro-batch out for one decoder pass. Sequences 0..B-1 are the chosen sides, B..2B-1 the rejected.

    Plain layout: 2B right-padded rows (prompt + completion), a 2D mask. Shared-prompt layout (when every pair's
    two prompts are identical): each pair is one segment of prompt + chosen + rejected, where rejected tokens
    see the prompt and themselves but not the chosen tokens, and continue the prompt's positions: the prompt is
    encoded once. Segments are packed several to a row (`pack_rows`, rows as long as the longest segment), each
    seeing only itself, with its own positions: the padding a row per pair would need is mostly gone.
    Rows are padded to a multiple of `pad_to_multiple_of` tokens (masked: no value changes but for rounding).
    """
    B = len(examples)
    shared = (
        with_rejected
        and shared_prompt
        and all(e["chosen_prompt_ids"] == e["rejected_prompt_ids"] for e in examples)
    )
    if shared:  # a sequence per pair, packed into rows below
        seqs = [e["chosen_prompt_ids"] + e["chosen_ids"] + e["rejected_ids"] for e in examples]
    else:  # a row per sequence
        seqs = [e["chosen_prompt_ids"] + e["chosen_ids"] for e in examples]
        if with_rejected:
            seqs += [e["rejected_prompt_ids"] + e["rejected_ids"] for e in examples]
    T = -(-max(len(t) for t in seqs) // pad_to_multiple_of) * pad_to_multiple_of
    if shared:
        places = pack_rows([len(t) for t in seqs], T)
        R = 1 + max(row for row, _ in places)
    else:
        R = len(seqs)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    rows, positions, targets, seq = [], [], [], []

    def completion(row: int, first_pos: int, predict_from: int, ids: list[int], seq_id: int):
        # Token ids[0] is predicted by the hidden state at `predict_from`, each later one by its left neighbour.
        for k, tok in enumerate(ids):
            rows.append(row)
            positions.append(predict_from if k == 0 else first_pos + k - 1)
            targets.append(tok)
            seq.append(seq_id)

    if shared:
        allowed = torch.zeros((R, T, T), dtype=torch.bool)
        causal = torch.ones((T, T), dtype=torch.bool).tril()
        for i, (e, (row, o)) in enumerate(zip(examples, places, strict=True)):
            P, C, Rj = len(e["chosen_prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])
            n = P + C + Rj
            input_ids[row, o : o + n] = torch.tensor(seqs[i])
            position_ids[row, o : o + n] = torch.cat([torch.arange(P + C), torch.arange(P, P + Rj)])
            allowed[row, o : o + n, o : o + n] = causal[:n, :n]  # a pair sees nothing of its row's others
            allowed[row, o + P + C : o + n, o + P : o + P + C] = False  # rejected tokens never see the chosen
            completion(row, o + P, o + P - 1, e["chosen_ids"], i)
            completion(row, o + P + C, o + P - 1, e["rejected_ids"], B + i)
        # Padding query rows attend to themselves only, so that no softmax row is empty.
        idx = torch.arange(T)
        allowed[:, idx, idx] = True
        mask_value = _mask_value(mask_dtype, attn_implementation)
        if mask_value is None:
            attention_mask = allowed.unsqueeze(1)
        else:
            attention_mask = torch.zeros((R, 1, T, T), dtype=mask_dtype).masked_fill(
                ~allowed.unsqueeze(1), mask_value
            )
    else:
        attention_mask = torch.zeros((R, T), dtype=torch.long)
        sides = [("chosen", row) for row in range(B)] + (
            [("rejected", row) for row in range(B)] if with_rejected else []
        )
        for row, (side, i) in enumerate(sides):
            e = examples[i]
            P, ids = len(e[f"{side}_prompt_ids"]), e[f"{side}_ids"]
            n = P + len(ids)
            input_ids[row, :n] = torch.tensor(seqs[row])
            attention_mask[row, :n] = 1
            position_ids[row, :n] = torch.arange(n)
            completion(row, P, P - 1, ids, row)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(
        input_ids,
        attention_mask,
        position_ids,
        as_long(rows),
        as_long(positions),
        as_long(targets),
        as_long(seq),
        2 * B if with_rejected else B,
    )
