"""Resume by result fingerprint: a checkpoint continues only the run that wrote it (same model, pairs, settings and
process count), whatever else changed; another run's checkpoint is refused in one line and kept; --restart sets
checkpoints aside; every process's RNG is restored, so a resume with LoRA dropout repeats the uninterrupted run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from alma_r.models.train import checkpoints
from alma_r.models.train.checkpoints import CheckpointMismatch
from alma_r.models.train.recipe import CPORecipe
from tests.helpers import files_digest
from tests.test_train_cli import ENV, adapter, pairs_file, train_cmd  # noqa: F401 (pairs_file: a fixture)
from tests.test_trainer import PAIRS, Crash, losses, settings

# 6 steps of 2 pairs, checkpoints at steps 2 and 4, LoRA dropout on: the rerun redoes steps 5-6 from step 4.
RUN = ("--max-steps", "6", "--per-device-train-batch-size", "2")
RUN += ("--lora-dropout", "0.1", "--no-disable-dropout")  # disable_dropout would set the dropout to 0


def run_train(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`alma-r train` with this file's run settings (RUN) and `extra`, its output captured."""
    return subprocess.run(train_cmd(model, data, out, *RUN, *extra), env=ENV, capture_output=True, text=True)


def reversed_pairs(source: Path, folder: Path) -> Path:
    """The same rows in the opposite order: other data by the fingerprint (order is part of the result)."""
    path = folder / "reversed.parquet"
    pq.write_table(pa.Table.from_pylist(pq.read_table(source).to_pylist()[::-1]), path)
    return path


@pytest.fixture(scope="module")
def earlier_run(tiny_model_dir, pairs_file, tmp_path_factory) -> Path:  # noqa: F811
    """A finished `alma-r train` run that left checkpoints at steps 2 and 4; tests work on copies of it."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    cmd = train_cmd(tiny_model_dir, pairs_file, out, *RUN, "--save-steps", "2")
    subprocess.run(cmd, check=True, env=ENV, capture_output=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    return out


def test_other_data_is_refused_and_the_same_data_resumes_to_the_same_adapter(
    tiny_model_dir,
    pairs_file,  # noqa: F811
    earlier_run,
    tmp_path,
):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    before = files_digest(out / "checkpoints")
    other = reversed_pairs(pairs_file, tmp_path)
    refused = run_train(tiny_model_dir, other, out, "--save-steps", "2")
    assert refused.returncode == 2, refused.stderr[-2000:]  # a config error (tasks/runtime/failures.py)
    assert "Traceback" not in refused.stderr  # one line, not a bug report
    last = refused.stderr.strip().splitlines()[-1]
    assert str(out / "checkpoints" / "step-4") in last
    assert "pairs digest" in last and "(checkpoint) vs" in last and "(now)" in last
    assert "use a new --output folder, or --restart to set these checkpoints aside" in last
    assert files_digest(out / "checkpoints") == before  # refused, not deleted nor rewritten

    # The same data with another logging and checkpoint cadence: the same run, resumed from step 4.
    resumed = run_train(tiny_model_dir, pairs_file, out, "--save-steps", "3", "--logging-steps", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    assert summary["resumed_checkpoint_written_by"].startswith("alma-r ")
    # Steps 5 and 6 were redone with dropout: the same masks only if the RNG came back with the checkpoint.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (earlier_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 6]
    assert records[-1]["loss"] == pytest.approx(first[-1]["loss"], rel=1e-5)
    a, b = adapter(earlier_run), adapter(out)
    assert a.keys() == b.keys()
    for name in a:  # the tolerance of test_train_cli's SIGKILL-and-resume test
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_restart_sets_the_checkpoints_aside_and_trains_from_step_0(
    tiny_model_dir,
    pairs_file,  # noqa: F811
    earlier_run,
    tmp_path,
):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    before = files_digest(out / "checkpoints")
    other = reversed_pairs(pairs_file, tmp_path)
    done = run_train(tiny_model_dir, other, out, "--save-steps", "2", "--restart")
    assert done.returncode == 0, done.stderr[-2000:]
    (aside,) = (out / ".superseded").iterdir()
    assert aside.name.startswith("checkpoints-")
    assert [line for line in done.stdout.splitlines() if "--restart" in line] == [
        f"[train] --restart: {out}'s checkpoints moved to {aside}; training starts at step 0"
    ]
    assert {k: v for k, v in files_digest(aside).items() if k.startswith("step-")} == before
    assert (aside / "metrics.jsonl").read_text() == (earlier_run / "metrics.jsonl").read_text()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] is None and summary["resumed_checkpoint_written_by"] is None
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == list(
        range(1, 7)
    )
    state = checkpoints.read_state(out / "checkpoints" / "step-4")
    assert state["parts"]["pairs digest"] != checkpoints.read_state(aside / "step-4")["parts"]["pairs digest"]


# ------------------------------------------------------------------------------------- fingerprint, no training
def fingerprint_of(model_dir, out_dir, pairs=PAIRS, seed=7, **kw) -> tuple[str, dict]:
    """The result fingerprint and parts of a recipe that is not set up (only its accelerator: the process
    count is a part)."""
    code_version = kw.pop("code_version", None)
    recipe = CPORecipe(settings(**kw), str(model_dir), pairs, out_dir, seed=seed, code_version=code_version)
    recipe._setup_distributed()
    return recipe._fingerprint(), recipe._result_parts()


def test_the_fingerprint_covers_what_changes_the_result_only(tiny_model_dir, tmp_path):
    base, parts = fingerprint_of(tiny_model_dir, tmp_path)
    assert parts["model"].startswith("weights sha256 ") and parts["adapter"] is None
    assert parts["world_size"] == 1 and parts["batch_size"] == 2 and parts["lora.dropout"] == 0.1
    assert json.loads(json.dumps(parts)) == parts  # readable: stored as it is beside the hash

    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir, moved)
    changed_model = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed_model)
    weights = load_file(changed_model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed_model / "model.safetensors", metadata={"format": "pt"})
    swapped = [PAIRS[1], PAIRS[0], *PAIRS[2:]]

    same = {
        "logging_steps": fingerprint_of(tiny_model_dir, tmp_path, logging_steps=3)[0],
        "save_steps": fingerprint_of(tiny_model_dir, tmp_path, save_steps=7)[0],
        "code_version": fingerprint_of(tiny_model_dir, tmp_path, code_version="alma-r 9.9")[0],
        "a moved model folder": fingerprint_of(moved, tmp_path)[0],
    }
    assert same == dict.fromkeys(same, base)
    differs = {
        "beta": fingerprint_of(tiny_model_dir, tmp_path, beta=0.5),
        "pairs": fingerprint_of(tiny_model_dir, tmp_path, pairs=PAIRS[:-1]),
        "pair order": fingerprint_of(tiny_model_dir, tmp_path, pairs=swapped),
        "seed": fingerprint_of(tiny_model_dir, tmp_path, seed=8),
        "model": fingerprint_of(changed_model, tmp_path),
        "batch_size": fingerprint_of(tiny_model_dir, tmp_path, batch_size=4),
    }
    first_field = {what: checkpoints.first_difference(parts, p)[0] for what, (_, p) in differs.items()}
    assert first_field == {
        "beta": "beta",
        "pairs": "pairs digest",
        "pair order": "pairs digest",
        "seed": "seed",
        "model": "model",
        "batch_size": "batch_size",
    }
    assert all(fp != base for fp, _ in differs.values())
    # The DPO reference cache: every process scores every pair, so only the process count may differ.
    assert checkpoints.reference_fingerprint(parts | {"world_size": 2}) == checkpoints.reference_fingerprint(
        parts
    )
    assert checkpoints.reference_fingerprint(differs["pairs"][1]) != checkpoints.reference_fingerprint(parts)


def test_a_checkpoint_without_parts_is_refused_by_its_fingerprint(tmp_path):
    parts = checkpoints.result_parts("weights sha256 00", None, "ab", {"beta": 0.1}, 1)
    checkpoints.check_resumable(tmp_path, {"fingerprint": checkpoints.fingerprint(parts)}, parts, "hint")
    with pytest.raises(
        CheckpointMismatch,
        match=r"records no parts\) 1234 \(checkpoint\) vs [0-9a-f]{16} \(now\); hint$",
    ):
        checkpoints.check_resumable(tmp_path, {"fingerprint": "1234"}, parts, "hint")


# ------------------------------------------------------------------------------------- in-process resume
def test_refusal_ends_with_the_callers_hint_and_a_dropout_resume_repeats_the_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    kw = dict(
        max_steps=4, save_steps=2, lora={"r": 4, "alpha": 8, "dropout": 0.3, "target_modules": ["q_proj"]}
    )

    def recipe(out, **extra) -> CPORecipe:
        return CPORecipe(settings(**kw), str(tiny_model_dir), PAIRS, out, seed=5, **extra)

    straight = recipe(tmp_path / "straight").setup().train()
    crashing = recipe(tmp_path / "resumed", code_version="v1").setup()
    real_loss = crashing._loss

    def loss_then_crash(*args, **kwargs):
        if crashing.step == 3:  # dies inside step 4, after the step-2 checkpoint
            raise Crash("node died")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(crashing, "_loss", loss_then_crash)
    with pytest.raises(Crash):
        crashing.train()
    step_2 = tmp_path / "resumed" / "checkpoints" / "step-2"
    state = checkpoints.read_state(step_2)
    assert state["written_by"] == "v1" and len(state["rng"]) == 1
    readable = json.loads((step_2 / "fingerprint.json").read_text())
    assert readable["fingerprint"] == state["fingerprint"] and readable["parts"] == state["parts"]
    assert readable["parts"]["seed"] == 5 and readable["parts"]["lora.dropout"] == 0.3

    hint = "rerun with --force train"
    with pytest.raises(
        CheckpointMismatch, match=r"step-2: .*seed 5 \(checkpoint\) vs 6 \(now\); rerun with --force train$"
    ):
        CPORecipe(
            settings(**kw), str(tiny_model_dir), PAIRS, tmp_path / "resumed", seed=6, start_over_hint=hint
        ).setup()

    torch.manual_seed(1234)  # whatever the process drew before: the checkpoint's RNG state wins
    torch.rand(1000)
    resumed = recipe(tmp_path / "resumed", code_version="v2").setup()
    assert resumed.resumed_from == 2 and resumed.summary()["resumed_checkpoint_written_by"] == "v1"
    resumed.train()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert list(b) == [1, 2, 3, 4]
    assert b == pytest.approx(a, rel=1e-5)
    for (name, p1), (_, p2) in zip(
        straight.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        if p1.requires_grad:
            torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6, msg=name)
