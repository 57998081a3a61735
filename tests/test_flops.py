"""benchmarks/flops.py's FLOP formula against an independent count: torch.utils.flop_counter.FlopCounterMode
over a real forward and backward of a tiny LLaMA (grouped-query attention, eager attention so that every matmul
is visible), full fine-tuning and LoRA on several target sets, FLOP for FLOP."""

from __future__ import annotations

import pytest
import torch

from benchmarks.flops import DecoderShape, generation_flops, sequence_flops, step_flops

LORA_TARGETS = [("q_proj", "v_proj"), ("down_proj",), ("k_proj",), ("o_proj", "gate_proj", "up_proj")]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def counted(model, n: int) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, model.config.vocab_size, (1, n))
    with FlopCounterMode(display=False) as forward:
        logits = model(ids).logits
    with FlopCounterMode(display=False) as backward:
        logits.float().pow(2).mean().backward()
    return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops()}


@pytest.mark.parametrize("n", [1, 9])
def test_full_fine_tuning_matches_the_counted_matmuls(n):
    model = tiny_llama()
    expected = sequence_flops(DecoderShape.of(model.config), n)
    assert {k: expected[k] for k in ("forward", "backward")} == counted(model, n)


@pytest.mark.parametrize("targets", LORA_TARGETS, ids="+".join)
def test_lora_matches_the_counted_matmuls(targets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    )
    expected = sequence_flops(DecoderShape.of(model.config), 7, lora_rank=4, lora_targets=targets)
    assert {k: expected[k] for k in ("forward", "backward")} == counted(model, 7)


def test_a_hand_count_of_one_token():
    # One layer, hidden 2, one head of size 2, intermediate 3, vocabulary 5, n = 1:
    # q, k, v, o: 2·1·2·2 = 8 each -> 32; QKᵀ, AV: 2·1·1·1·2 = 4 each -> 8; gate, up, down: 2·1·2·3 = 12 each
    # -> 36; lm_head 2·1·2·5 = 20; rotary 2·1 = 2. Forward 98; backward 2 x (98 - 2) = 192.
    shape = DecoderShape(vocab=5, hidden=2, intermediate=3, layers=1, heads=1, kv_heads=1, head_dim=2)
    assert sequence_flops(shape, 1) == {"forward": 98, "backward": 192, "total": 290}


def test_a_step_sums_its_sequences_and_lora_needs_targets():
    shape = DecoderShape(vocab=5, hidden=2, intermediate=3, layers=1, heads=1, kv_heads=1, head_dim=2)
    assert step_flops(shape, [1, 1, 3]) == 2 * 290 + sequence_flops(shape, 3)["total"]
    with pytest.raises(ValueError, match="trains nothing"):
        sequence_flops(shape, 3, lora_rank=2)


@pytest.mark.parametrize("beams, new_tokens", [(1, 4), (3, 5)])
def test_generation_flops_equal_the_counter_on_generate(beams, new_tokens):
    # A padded batch of 2 prompts of 7 positions, beam search, every row forced to new_tokens steps.
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llama().eval()
    ids = torch.randint(3, 90, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding costs what a real position does
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            num_beams=beams,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    expected = generation_flops(DecoderShape.of(model.config), 7, new_tokens, 2 * beams)
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("targets", [None, ("down_proj",), ("q_proj", "v_proj")], ids=["full", "down", "qv"])
def test_our_engine_executes_the_shared_prompt_count(targets):
    """One pair in one row, no padding: FlopCounterMode over CompletionLogps' forward and backward (the decoder
    once over prompt + chosen + rejected, the head through TokenLogps) gives shared_prompt_step_flops exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    from alma_r.models.loading import add_lora
    from alma_r.models.train.batching import collate
    from alma_r.models.train.logprobs import ROW_BUCKET, CompletionLogps
    from benchmarks.flops import shared_prompt_step_flops

    model = tiny_llama()
    if targets:
        model = add_lora(model, 4, 8, 0.0, targets)
    p, c, r = 10, 40, ROW_BUCKET - 40  # completion rows a multiple of the head's row bucket: none padded
    g = torch.Generator().manual_seed(1)
    ids = lambda k: torch.randint(0, 96, (k,), generator=g).tolist()  # noqa: E731
    prompt = ids(p)
    pair = {
        "chosen_prompt_ids": prompt,
        "rejected_prompt_ids": prompt,
        "chosen_ids": ids(c),
        "rejected_ids": ids(r),
    }
    batch = collate(
        [pair], pad_id=0, shared_prompt=True, mask_dtype=torch.float32, attn_implementation="eager"
    )
    assert batch.input_ids.shape == (1, p + c + r)
    with FlopCounterMode(display=False) as counter:
        logps, _ = CompletionLogps(model)(batch)
        logps.sum().backward()
    shape = DecoderShape.of(model.config)
    rank = None if targets is None else 4
    assert counter.get_total_flops() == shared_prompt_step_flops(shape, [(p, c, r)], rank, targets or ())
