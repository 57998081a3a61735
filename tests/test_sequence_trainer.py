"""The sequence-level CPO recipe: reference log-probs are the reference model's for exactly the negatives trained on,
MN negatives follow the policy (or not), the loss at step 1 is log K, it learns, LoRA works, and a run killed
with SIGKILL after a checkpoint resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from alma_r.models import synthetic
from alma_r.models.loading import load_model
from alma_r.models.sequence.negatives import NegativeMix
from alma_r.models.sequence.trainer import SequenceCPORecipe, SequenceCPOSettings
from alma_r.models.train.batching import collate
from alma_r.models.train.checkpoints import CheckpointMismatch
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


def _record_batches(recipe) -> list:
    """Every StepBatch the recipe prepares, in order."""
    batches, prepare = [], recipe._prepare_step
    recipe._prepare_step = lambda step, idx: batches.append(prepare(step, idx)) or batches[-1]
    return batches


def _reference_logps(model_dir, recipe, batch) -> torch.Tensor:
    """log pi of a batch's sequences under a fresh load of the starting model."""
    flat = [
        {"chosen_prompt_ids": recipe.examples[i]["prompt_ids"], "chosen_ids": seq}
        for i, row in zip(batch.indices, batch.completions, strict=True)
        for seq in row
    ]
    with torch.no_grad():
        logps, _ = CompletionLogps(load_model(str(model_dir)))(
            collate(flat, recipe.tokenizer.pad_token_id, with_rejected=False)
        )
    return logps.view(len(batch.indices), -1)


@pytest.mark.parametrize(
    "finetune,ranking", [("full", False), ("full", True), ("lora", False)], ids=["full", "ranked", "lora"]
)
def test_reference_logps_are_the_starting_models_for_exactly_the_negatives_trained_on(
    model_dir, tmp_path, finetune, ranking
):
    settings = _settings(loss="plackett_luce" if ranking else "best_of_k", finetune=finetune)
    recipe = SequenceCPORecipe(settings, str(model_dir), _examples(12), tmp_path, seed=0).setup()
    batches = _record_batches(recipe)
    recipe.train()
    assert len(batches) == 3 and recipe.reference_forward_passes == 3
    for batch in batches:
        K = len(batch.completions[0])
        assert K == 5 and batch.ref_logps.shape == (4, 5)
        # the policy moved during training; the reference values stay the starting model's, of these sequences
        torch.testing.assert_close(
            batch.ref_logps, _reference_logps(model_dir, recipe, batch), rtol=0, atol=1e-5
        )
        if ranking:
            assert (batch.ranking[:, 0] == 0).all() and sorted(batch.ranking[0].tolist()) == list(range(K))
        else:
            assert batch.ranking is None
    with torch.no_grad():
        now = recipe._completion_logps(recipe.plain_logps, batches[0].indices, batches[0].completions)
    assert not torch.allclose(
        now, batches[0].ref_logps, atol=1e-3
    )  # the policy moved away from the reference

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # step 1 is computed before any update: policy = reference, every reward 0, loss log K (best-of-K) or
    # log K! (Plackett-Luce: sum over k of log(K - k))
    want = math.log(math.factorial(5)) if ranking else math.log(5)
    assert records[0]["loss"] == pytest.approx(want, abs=1e-5)
    assert records[0]["rewards/accuracies"] == 0.0 and abs(records[0]["rewards/ground_truth"]) < 1e-5
    assert {"rewards/bn", "rewards/mn", "rewards/tn", "accuracies/tn"} <= set(records[0])
    if finetune == "lora":  # only the adapter trains; the saved folders are a PEFT adapter and a merged model
        assert recipe.is_peft and recipe.reference_model is None
        out = recipe.save(tmp_path / "adapter")
        assert (out / "adapter_model.safetensors").is_file()
        assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("source", ["policy", "reference"])
def test_meanfield_negatives_follow_the_policy_only_when_drawn_from_it(model_dir, tmp_path, source):
    mix = NegativeMix(batch=1, meanfield=3, truncation=1, mn_source=source)
    recipe = SequenceCPORecipe(
        _settings(negatives=mix), str(model_dir), _examples(8), tmp_path, seed=0
    ).setup()
    indices = recipe._step_indices(0)
    before = recipe._prepare_step(0, indices)
    with torch.no_grad():  # another policy: its next-token distributions differ everywhere
        for p in recipe.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    after = recipe._prepare_step(0, indices)
    mn = [1 + j for j, kind in enumerate(recipe.kinds) if kind == "mn"]
    others = [c for c in range(len(recipe.kinds) + 1) if c not in mn]
    column = lambda b, cols: [[row[c] for c in cols] for row in b.completions]  # noqa: E731
    assert column(before, others) == column(after, others)  # ground truth, BN, TN: seeded, no model
    if source == "policy":
        assert column(before, mn) != column(after, mn)
    else:
        assert column(before, mn) == column(after, mn)
    # whatever drew them, the reference values are the starting model's for exactly these sequences
    for batch in (before, after):
        torch.testing.assert_close(
            batch.ref_logps, _reference_logps(model_dir, recipe, batch), rtol=0, atol=1e-5
        )


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
    assert summary["mn_source"] == "policy" and summary["resumed_from"] is None


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


def test_a_checkpoint_of_other_settings_is_refused(model_dir, tmp_path):
    SequenceCPORecipe(
        _settings(max_steps=2, save_steps=1), str(model_dir), _examples(8), tmp_path, seed=0
    ).setup().train()
    assert (tmp_path / "checkpoints" / "step-1").is_dir()
    other = _settings(max_steps=2, save_steps=1, beta=2.0)
    with pytest.raises(CheckpointMismatch, match="beta"):
        SequenceCPORecipe(other, str(model_dir), _examples(8), tmp_path, seed=0).setup()
    # settings that are no part of the result (save_steps, logging_steps) resume
    same = _settings(max_steps=2, save_steps=7, logging_steps=3)
    assert SequenceCPORecipe(same, str(model_dir), _examples(8), tmp_path, seed=0).setup().step == 1


# The child process of the SIGKILL test: full fine-tuning with MN from the policy (the draws depend on the weights,
# so a resume that restored them wrongly would draw other negatives), a checkpoint every 2 steps; after step 4
# every step sleeps, so that the parent can kill it between checkpoints (sleeping changes no number).
CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    from alma_r.models.sequence.trainer import SequenceCPORecipe
    from tests.test_sequence_trainer import _examples, _settings
    model_dir, out, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
    recipe = SequenceCPORecipe(_settings(max_steps=10, save_steps=2, batch_size=4), model_dir, _examples(12), out, seed=5)
    recipe.setup()
    step = recipe._optimizer_step
    def slowed():
        out = step()
        if slow and recipe.step >= 4:
            time.sleep(1.0)
        return out
    recipe._optimizer_step = slowed
    recipe.train().save(recipe.out_dir / "model")
    """
)


def test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_weights(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = lambda out, mode: [sys.executable, "-c", CHILD, str(model_dir), str(out), mode]  # noqa: E731
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(run(straight, "fast"), check=True, env=env, timeout=600)

    proc = subprocess.Popen(run(killed, "slow"), env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # past step 5: the kill lands between checkpoints, work after step 4 is lost
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model").exists()

    subprocess.run(run(killed, "fast"), check=True, env=env, timeout=600)
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 10
    a, b = (load_file(d / "model" / "model.safetensors") for d in (straight, killed))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    losses = lambda d: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(killed) == pytest.approx(losses(straight), rel=1e-5)


def test_two_processes_train_as_one_process_with_the_same_batch(model_dir, tmp_path):
    """accelerate launch, 2 CPU processes (gloo) x 2 examples = 1 process x 4: the same negatives (drawn for the
    whole step on each process), the same loss and gradient norm every step (the losses are means over the whole
    step and DDP averages the gradients: a process training on the other's share, or a loss normalised per
    process, shows here)."""
    import socket
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "child.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n" + CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, str(script), str(model_dir), str(one), "fast"], check=True, env=env, timeout=600
    )
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]  # fmt: skip
    done = subprocess.run(
        [*launcher, str(script), str(model_dir), str(two), "fast"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "train_summary.json").read_text())["processes"] == 2
    records = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)


def test_bad_settings_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size >= 2"):
        SequenceCPOSettings(batch_size=1)
    with pytest.raises(ValueError, match="beta"):
        SequenceCPOSettings(beta=0)
    with pytest.raises(ValueError, match="lora.dropout"):
        SequenceCPOSettings(finetune="lora", lora={"dropout": 0.1})
    with pytest.raises(ValueError, match="autoregressive negatives need"):
        SequenceCPORecipe(
            SequenceCPOSettings(negatives=NegativeMix(autoregressive=2)), "x", _examples(2), tmp_path, seed=0
        )
