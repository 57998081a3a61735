"""The engine's memory and layout choices change no value: selective activation recompute (models/train/recompute.py)
gives bitwise the run without it; padding rows to a multiple of 8 tokens and packing several pairs to a row change
only rounding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alma_r.models.train.batching import collate, pack_rows, tokenize_pairs
from alma_r.models.train.logprobs import CompletionLogps
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.recompute import _kept, recompute_mode
from alma_r.models.train.settings import TrainSettings

PAIRS = [
    {
        "prompt": f"Translate this from German to English:\nGerman: Satz {i}\nEnglish:",
        "chosen": f"Sentence number {i}" + " and more" * (i % 3),
        "rejected": f"Wrong {i} sentence",
    }
    for i in range(8)
]


def _train(model_dir, out_dir, **kw):
    settings = TrainSettings(
        learning_rate=5e-3, warmup_ratio=0.0, max_steps=3, batch_size=4, save_steps=100, logging_steps=1,
        max_prompt_length=64, max_length=128, **kw,
    )  # fmt: skip
    recipe = CPORecipe(settings, str(model_dir), PAIRS, out_dir, seed=3).setup()
    recipe.train().save(out_dir / "model")
    losses = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    weights = next((out_dir / "model").glob("*.safetensors"))
    return recipe, losses, load_file(weights)


@pytest.mark.parametrize(
    "kw",
    [
        {"finetune": "full"},
        # LoRA with dropout: the replay must draw the same dropout masks (checkpoint restores the RNG)
        {"lora": {"r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj", "down_proj"]},
         "disable_dropout": False},
    ],
    ids=["full", "lora-dropout"],
)  # fmt: skip
def test_elementwise_recompute_is_bitwise_the_run_without_it(tiny_model_dir, tmp_path, kw):
    off, off_losses, off_weights = _train(tiny_model_dir, tmp_path / "off", activation_recompute="off", **kw)
    on, on_losses, on_weights = _train(
        tiny_model_dir, tmp_path / "on", activation_recompute="elementwise", **kw
    )
    assert (off.recompute, on.recompute) == ("off", "elementwise")
    base = on.model.get_base_model() if on.is_peft else on.model
    assert (
        base.is_gradient_checkpointing
        and not (off.model.get_base_model() if off.is_peft else off.model).is_gradient_checkpointing
    )
    assert on_losses == off_losses and len(on_losses) == 3
    assert on_weights.keys() == off_weights.keys()
    for name, tensor in on_weights.items():
        assert torch.equal(tensor, off_weights[name]), name


def test_recompute_mode():
    assert recompute_mode("auto", "full", False, 512) == "elementwise"
    assert recompute_mode("auto", "full", False, 128) == "off"  # a tiny model: only the replay's overhead
    assert recompute_mode("auto", "lora", False, 4096) == "off"
    assert recompute_mode("elementwise", "lora", False, 64) == "elementwise"
    assert recompute_mode("off", "full", False, 4096) == "off"
    assert recompute_mode("elementwise", "full", True, 4096) == "layers"  # gradient_checkpointing overrides


def test_the_policy_keeps_matmuls_and_attention_only():
    aten = torch.ops.aten
    kept = [aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_efficient_attention.default]  # fmt: skip
    recomputed = [
        aten.mul.Tensor,
        aten.silu.default,
        aten.rsqrt.default,
        aten._to_copy.default,
        aten.add.Tensor,
    ]
    assert all(_kept(op) for op in kept)
    assert not any(_kept(op) for op in recomputed)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_rows_padded_to_a_multiple_of_8_give_the_same_logps(tiny_model_dir, shared_prompt):
    from alma_r.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    examples, _ = tokenize_pairs(tokenizer, PAIRS[:3], max_prompt_length=64, max_length=128)
    plain = collate(examples, tokenizer.pad_token_id, shared_prompt=shared_prompt)
    padded = collate(examples, tokenizer.pad_token_id, shared_prompt=shared_prompt, pad_to_multiple_of=8)
    assert plain.input_ids.shape[1] % 8 != 0  # else nothing would be padded
    assert padded.input_ids.shape[1] % 8 == 0 and padded.input_ids.shape[1] > plain.input_ids.shape[1]
    with torch.no_grad():
        a, na = CompletionLogps(model)(plain)
        b, nb = CompletionLogps(model)(padded)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert na.tolist() == nb.tolist()


def test_pack_rows_first_fit_by_decreasing_length():
    # capacity 10: 7 opens row 0, 6 row 1, 3 fills row 0 (7+3), 4 joins row 1 (6+4), 2 opens row 2
    assert pack_rows([3, 7, 4, 6, 2], 10) == [(0, 7), (0, 0), (1, 6), (1, 0), (2, 0)]
    assert pack_rows([5], 5) == [(0, 0)]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([6], 5)


def test_packed_pairs_give_the_logps_and_gradients_of_one_row_per_sequence(tiny_model_dir):
    """Several pairs share a row in the shared-prompt layout; each must see only itself (its own positions, a
    block of the mask), so its log-probs and the gradients equal those of the plain layout (a row per sequence)."""
    from alma_r.models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    long = {"prompt": PAIRS[0]["prompt"], "chosen": "a much longer sentence " * 12, "rejected": "long " * 20}
    examples, _ = tokenize_pairs(tokenizer, [long, *PAIRS[:4]], max_prompt_length=64, max_length=256)
    packed = collate(examples, tokenizer.pad_token_id, shared_prompt=True)
    assert packed.input_ids.shape[0] < len(examples)  # some rows hold two or more pairs
    runs = []
    for batch in (packed, collate(examples, tokenizer.pad_token_id, shared_prompt=False)):
        model.zero_grad()
        logps, n_tokens = CompletionLogps(model, chunk_size=5)(batch)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        runs.append((logps.detach(), n_tokens, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, na, ga), (b, nb, gb) = runs
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert na.tolist() == nb.tolist()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=2e-5, msg=name)  # float32 sums
