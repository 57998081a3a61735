"""The sequence-level CPO recipe: reference log-probs once, the loss at step 1 is log K, it learns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alma_r.models import synthetic
from alma_r.models.loading import load_model
from alma_r.models.sequence.negatives import NegativeMix
from alma_r.models.sequence.trainer import SequenceCPORecipe, SequenceCPOSettings
from alma_r.models.train.batching import collate
from alma_r.models.train.logprobs import CompletionLogps

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return synthetic.build_model(tmp_path_factory.mktemp("seqtrain") / "model", seed=0)


def _examples(n: int) -> list[dict]:
    task = synthetic.make_task(4, n_train=0, n_preference=n, n_test=0, p_drop_adj=0.0)
    return [{"id": s.id, "prompt": s.prompt, "target": s.ref} for s in task.preference]


def _settings(**kw) -> SequenceCPOSettings:
    base = dict(
        negatives=NegativeMix(batch=1, meanfield=2, truncation=1),
        batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        max_prompt_length=64,
        max_length=128,
    )
    return SequenceCPOSettings(**{**base, **kw})


def _count_decoder_calls(model) -> list[bool]:
    """Record every decoder forward pass, and whether autograd was on."""
    calls = []
    model.get_decoder().register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("ranking", [False, True])
def test_reference_logps_are_computed_once_by_the_starting_model(model_dir, tmp_path, ranking):
    settings = _settings(loss="plackett_luce" if ranking else "best_of_k")
    recipe = SequenceCPORecipe(settings, str(model_dir), _examples(12), tmp_path, seed=0)
    recipe._setup_model()
    calls = _count_decoder_calls(recipe.model)
    recipe._setup_data()
    recipe._setup_steps()
    recipe._setup_optimizer()
    # setup: per step one pass for the meanfield negatives and one for the reference, none with autograd
    assert calls == [False] * (2 * 3) and recipe.reference_forward_passes == 3
    calls.clear()
    recipe.train()
    assert calls == [True] * 3  # training: the policy only, one pass per step, never the reference again

    # the cached values are the starting model's, recomputed independently from a fresh load
    fresh = CompletionLogps(load_model(str(model_dir)))
    for batch in recipe.batches:
        K = len(batch.completions[0])
        assert K == 5 and batch.ref_logps.shape == (4, 5)
        flat = [
            {"chosen_prompt_ids": recipe.examples[i]["prompt_ids"], "chosen_ids": seq}
            for i, row in zip(batch.indices, batch.completions, strict=True)
            for seq in row
        ]
        with torch.no_grad():
            want, _ = fresh(collate(flat, recipe.tokenizer.pad_token_id, with_rejected=False))
        torch.testing.assert_close(batch.ref_logps, want.view(4, K), rtol=0, atol=1e-5)
        if ranking:
            assert (batch.ranking[:, 0] == 0).all() and sorted(batch.ranking[0].tolist()) == list(range(K))
        else:
            assert batch.ranking is None
    # the policy moved away from the reference
    with torch.no_grad():
        now = recipe._logps(recipe.batches[0].indices, recipe.batches[0].completions)
    assert not torch.allclose(now, recipe.batches[0].ref_logps, atol=1e-3)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # step 1 is computed before any update: policy = reference, every reward 0, loss log K (best-of-K) or
    # log K! (Plackett-Luce: sum over k of log(K - k))
    K = 5
    want = math.log(math.factorial(K)) if ranking else math.log(K)
    assert records[0]["loss"] == pytest.approx(want, abs=1e-5)
    assert records[0]["rewards/accuracies"] == 0.0 and abs(records[0]["rewards/ground_truth"]) < 1e-5
    assert {"rewards/bn", "rewards/mn", "rewards/tn", "accuracies/tn"} <= set(records[0])


def test_it_learns_to_prefer_the_ground_truth(model_dir, tmp_path):
    settings = _settings(max_steps=15, batch_size=4, micro_batch_size=2)
    recipe = SequenceCPORecipe(settings, str(model_dir), _examples(4), tmp_path, seed=1).setup().train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert records[-1]["rewards/accuracies"] == 1.0
    out = recipe.save(tmp_path / "model")
    assert (out / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["reference_forward_passes"] == 15 and summary["sequences_per_example"] == 5


def test_micro_batches_do_not_change_the_step(model_dir, tmp_path):
    """Gradient accumulation over micro-batches gives the same update as one pass (same negatives)."""
    weights = []
    for micro in (None, 1):
        recipe = SequenceCPORecipe(
            _settings(max_steps=1, micro_batch_size=micro),
            str(model_dir),
            _examples(8),
            tmp_path / str(micro),
            seed=0,
        )
        recipe.setup().train()
        weights.append(recipe.model.lm_head.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_bad_settings_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size >= 2"):
        SequenceCPOSettings(batch_size=1)
    with pytest.raises(ValueError, match="beta"):
        SequenceCPOSettings(beta=0)
    with pytest.raises(ValueError, match="autoregressive negatives need"):
        SequenceCPORecipe(
            SequenceCPOSettings(negatives=NegativeMix(autoregressive=2)), "x", _examples(2), tmp_path, seed=0
        )
