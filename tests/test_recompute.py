"""The engine's memory settings change no value: selective activation recompute (models/train/recompute.py) gives
bitwise the losses and weights of a run without it, and padding rows to a multiple of 8 tokens only rounding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alma_r.models.train.batching import collate, tokenize_pairs
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
    assert recompute_mode("auto", "full", False) == "elementwise"
    assert recompute_mode("auto", "lora", False) == "off"
    assert recompute_mode("elementwise", "lora", False) == "elementwise"
    assert recompute_mode("off", "full", False) == "off"
    assert recompute_mode("elementwise", "full", True) == "layers"  # gradient_checkpointing overrides


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
