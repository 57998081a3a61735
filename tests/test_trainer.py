"""The training recipe: a crash and resume reproduces the uninterrupted run; accumulation is invariant."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alma_r.models.train.checkpoints import CheckpointMismatch
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.settings import TrainSettings

PAIRS = [
    {
        "prompt": f"Translate this from German to English:\nGerman: Satz {i}\nEnglish:",
        "chosen": f"Sentence number {i}",
        "rejected": f"Wrong {i} sentence here",
    }
    for i in range(12)
]

SEED = 7  # the run's seed: a keyword of the recipe, not a training setting


def settings(**kw) -> TrainSettings:
    base = dict(
        learning_rate=5e-3,
        lr_scheduler="linear",
        warmup_ratio=0.0,
        max_steps=4,
        batch_size=2,
        save_steps=2,
        logging_steps=1,
        max_prompt_length=64,
        max_length=128,
        lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["down_proj", "q_proj"]},
        disable_dropout=False,  # the LoRA dropout is what the resume tests replay
    )
    return TrainSettings(**(base | kw))


def set_up(model_dir, out_dir, **kw) -> CPORecipe:
    """A recipe over PAIRS with settings(**kw), set up (resuming from out_dir's checkpoint if it has one)."""
    return CPORecipe(settings(**kw), str(model_dir), PAIRS, out_dir, seed=SEED).setup()


def losses(out_dir) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    }


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    straight = set_up(tiny_model_dir, tmp_path / "straight").train()
    straight.save(tmp_path / "straight" / "adapter")

    crashing = set_up(tiny_model_dir, tmp_path / "resumed")
    real_loss = crashing._loss

    def loss_then_crash(*args, **kwargs):
        if crashing.step == 3:  # dies inside step 4, after the step-2 checkpoint and step 3's log line
            raise Crash("node died")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(crashing, "_loss", loss_then_crash)
    with pytest.raises(Crash):
        crashing.train()

    resumed = set_up(tiny_model_dir, tmp_path / "resumed")
    assert resumed.resumed_from == 2
    resumed.train().save(tmp_path / "resumed" / "adapter")

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(b) == [1, 2, 3, 4]  # the log of the lost step 3 was replaced, not duplicated
    assert b == pytest.approx(a, rel=1e-5)
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


def test_checkpoint_of_other_settings_is_refused_and_kept(tiny_model_dir, tmp_path):
    set_up(tiny_model_dir, tmp_path, max_steps=3).train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    same = set_up(tiny_model_dir, tmp_path, max_steps=3, logging_steps=3, save_steps=1)
    assert same.resumed_from == 2
    with pytest.raises(CheckpointMismatch, match=r"beta 0\.1 \(checkpoint\) vs 0\.5 \(now\)"):
        set_up(tiny_model_dir, tmp_path, max_steps=3, beta=0.5)
    assert (tmp_path / "checkpoints" / "step-2" / "trainable.safetensors").is_file()


def test_gradient_accumulation_matches_the_larger_batch(tiny_model_dir, tmp_path):
    # The loss is normalised by the whole step's pairs and tokens: 1 micro-batch of 4 == 2 micro-batches of 2.
    common = dict(
        max_steps=1, cpo_alpha=1.0, lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["down_proj"]}
    )
    one = set_up(
        tiny_model_dir, tmp_path / "one", batch_size=4, gradient_accumulation_steps=1, **common
    ).train()
    two = set_up(
        tiny_model_dir, tmp_path / "two", batch_size=2, gradient_accumulation_steps=2, **common
    ).train()
    assert losses(tmp_path / "one")[1] == pytest.approx(losses(tmp_path / "two")[1], rel=1e-5)
    for (name, p1), (_, p2) in zip(one.model.named_parameters(), two.model.named_parameters(), strict=True):
        if p1.requires_grad:
            torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6, msg=name)


def test_training_moves_the_margin_towards_chosen(tiny_model_dir, tmp_path):
    recipe = set_up(
        tiny_model_dir, tmp_path, max_steps=30, learning_rate=2e-2, save_steps=100, logging_steps=30
    )
    first = recipe._forward(recipe.examples[:8])
    recipe.train()
    recipe.model.eval()
    with torch.no_grad():
        last = recipe._forward(recipe.examples[:8])
    margin = lambda out: (out.chosen_rewards - out.rejected_rewards).mean().item()  # noqa: E731
    assert margin(last) > margin(first) + 0.1


def test_gradient_checkpointing_and_bf16_autocast(tiny_model_dir, tmp_path):
    plain = set_up(tiny_model_dir, tmp_path / "a", max_steps=1)
    checkpointed = set_up(tiny_model_dir, tmp_path / "b", max_steps=1, gradient_checkpointing=True)
    idx = list(range(4))
    torch.testing.assert_close(plain._loss(idx)[0].loss, checkpointed._loss(idx)[0].loss)
    bf16 = set_up(tiny_model_dir, tmp_path / "c", max_steps=2, mixed_precision="bf16")
    out, logp_c, _ = bf16._loss(idx)
    assert logp_c.dtype == torch.float32 and torch.isfinite(out.loss)
    # bf16 matmuls, float32 log-softmax: close to the float32 loss, not equal to it.
    assert out.loss.item() == pytest.approx(plain._loss(idx)[0].loss.item(), rel=2e-2)
    bf16.train()
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / "c").values())


def test_dpo_uses_cached_reference_logps_of_the_starting_policy(tiny_model_dir, tmp_path):
    recipe = set_up(tiny_model_dir, tmp_path, loss_type="dpo", max_steps=2)
    assert recipe.ref_logps.shape == (len(PAIRS), 2)
    (cache,) = tmp_path.glob("reference_logps-*.safetensors")
    # At the start the policy is the reference: every log-ratio is 0, so the DPO loss is log 2 (+ NLL).
    out, _, _ = recipe._loss(list(range(4)))
    assert out.chosen_rewards.abs().max().item() < 1e-5 and out.rejected_rewards.abs().max().item() < 1e-5
    assert out.preference.item() == pytest.approx(math.log(2), abs=1e-5)
    recipe.train()
    again = set_up(tiny_model_dir, tmp_path, loss_type="dpo", max_steps=2)
    torch.testing.assert_close(again.ref_logps, load_file(cache)["logps"])
    torch.testing.assert_close(again.ref_logps, recipe.ref_logps)


def test_merged_model_equals_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = set_up(tiny_model_dir, tmp_path, max_steps=3, save_merged=True)
    recipe.train().save(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = with_adapter(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4)  # training did change the model


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_disable_dropout_sets_a_continued_adapters_dropout_to_zero(tiny_model_dir, tmp_path, disable_dropout):
    """TRL's disable_dropout: a continued adapter keeps its own lora_dropout (0.2 here), set to 0 unless off."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.2, target_modules=["q_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(tmp_path / "a")
    kept_lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}  # unused: continued
    recipe = CPORecipe(
        settings(disable_dropout=disable_dropout, lora=kept_lora),
        str(tiny_model_dir),
        PAIRS,
        tmp_path / "out",
        adapter=str(tmp_path / "a"),
        seed=SEED,
    ).setup()
    dropouts = [m.p for m in recipe.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.0 if disable_dropout else 0.2]  # the one layer's q_proj
    assert recipe._result_parts()["disable_dropout"] is disable_dropout  # a checkpoint of the other refuses
