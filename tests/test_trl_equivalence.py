"""Our CPO engine against TRL's own trainer (trl.experimental.cpo.CPOTrainer) on real WMT pairs: the same
loss, NLL and rewards at the first step, for every loss type TRL shares with us (TRL's tokenisation)."""

from __future__ import annotations

import pytest
import torch

from alma_r.config import SAMPLE_DIR
from alma_r.models.prompts import make_prompt
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.settings import TrainSettings

trl_cpo = pytest.importorskip("trl.experimental.cpo")


def wmt_pairs(n: int = 6) -> list[dict]:
    """WMT'22 de->en sources; chosen = the published ALMA-13B-R output, rejected = the WMT reference."""
    src = (SAMPLE_DIR / "wmt22/deen/test.de-en.de").read_text(encoding="utf-8").splitlines()
    ref = (SAMPLE_DIR / "wmt22/deen/test.de-en.en").read_text(encoding="utf-8").splitlines()
    hyp = (SAMPLE_DIR / "alma13br/deen/test.de-en.en").read_text(encoding="utf-8").splitlines()
    rows = [(s, h, r) for s, h, r in zip(src, hyp, ref, strict=True) if h != r and len(s) < 120]
    return [{"prompt": make_prompt(s, "de", "en"), "chosen": h, "rejected": r} for s, h, r in rows[:n]]


def trl_metrics(model_dir, pairs, loss_type, tmp_path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from alma_r.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Our completions start after a space (ALMA's "English: <translation>"); TRL takes the text as given. The
    # pairs Parquet's weight column goes in as it is: TRL ignores it without harm (docs/data-contracts.md).
    data = Dataset.from_list(
        [
            {
                "prompt": p["prompt"],
                "chosen": " " + p["chosen"],
                "rejected": " " + p["rejected"],
                "weight": p.get("weight", 1.0),
            }
            for p in pairs
        ]
    )
    args = trl_cpo.CPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(pairs),
        learning_rate=0.0,
        max_steps=1,
        beta=0.2,
        cpo_alpha=1.0,
        loss_type=loss_type,
        simpo_gamma=0.7,
        label_smoothing=0.0,
        max_length=512,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl_cpo.CPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    # TRL's Trainer leaves its accelerate state (bf16 on this CPU) in the process-wide singleton.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_first_step_equals_trl(tiny_model_dir, tmp_path, loss_type):
    pairs = wmt_pairs()
    expected = trl_metrics(tiny_model_dir, pairs, loss_type, tmp_path)
    settings = TrainSettings(
        loss_type=loss_type,
        beta=0.2,
        cpo_alpha=1.0,
        simpo_gamma=0.7,
        learning_rate=1e-9,
        max_steps=1,
        batch_size=len(pairs),
        tokenization="trl",
        finetune="full",
        max_prompt_length=256,
        max_length=512,
    )
    recipe = CPORecipe(settings, str(tiny_model_dir), pairs, tmp_path / "ours", seed=42).setup()
    assert len(recipe.examples) == len(pairs)
    with torch.no_grad():
        out, logp_c, logp_r = recipe._loss(list(range(len(pairs))))
    ours = {
        "loss": out.loss.item(),
        "nll_loss": out.nll.item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
    }
    # The margin is a difference of two rewards: it carries their absolute rounding (float32 sums over tokens, in
    # an order that kernels choose by CPU and layout), not a relative one of its own.
    scale = max(abs(expected["rewards/chosen"]), abs(expected["rewards/rejected"]))
    for key, value in ours.items():
        tolerance = 1e-5 * scale if key == "rewards/margins" else 1e-6
        assert value == pytest.approx(expected[key], rel=1e-5, abs=tolerance), key
    # TRL logs the summed (sigmoid, hinge) or averaged (ipo, simpo) log-probs it fed the loss.
    if loss_type in ("sigmoid", "hinge"):
        assert logp_c.mean().item() == pytest.approx(expected["logps/chosen"], rel=1e-5)
        assert logp_r.mean().item() == pytest.approx(expected["logps/rejected"], rel=1e-5)
