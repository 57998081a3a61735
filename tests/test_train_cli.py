"""`alma-r train` as users run it: killed with SIGKILL and restarted it ends with the uninterrupted run's adapter;
two data-parallel processes (accelerate, gloo) give the loss of one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from alma_r.config import SAMPLE_DIR
from alma_r.models.prompts import make_prompt

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Real WMT'22 en->de pairs: chosen = ALMA-13B-R's translation, rejected = the reference."""
    src = (SAMPLE_DIR / "wmt22/ende/test.en-de.en").read_text(encoding="utf-8").splitlines()
    ref = (SAMPLE_DIR / "wmt22/ende/test.en-de.de").read_text(encoding="utf-8").splitlines()
    hyp = (SAMPLE_DIR / "alma13br/ende/test.en-de.de").read_text(encoding="utf-8").splitlines()
    rows = [
        {"prompt": make_prompt(s, "en", "de"), "chosen": h, "rejected": r}
        for s, h, r in zip(src, hyp, ref, strict=True)
        if len(s) < 100
    ][:16]
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def train_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "alma_r.cli",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--learning-rate",
        "5e-3",
        "--lr-scheduler-type",
        "linear",
        "--warmup-ratio",
        "0",
        "--lora-target-modules",
        "q_proj",
        "down_proj",
        "--logging-steps",
        "1",
        "--seed",
        "3",
        *extra,
    ]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def logged(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_sigkill_and_resume_gives_the_uninterrupted_adapter(tiny_model_dir, pairs_file, tmp_path):
    args = ("--max-steps", "30", "--save-steps", "1", "--per-device-train-batch-size", "2")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        train_cmd(tiny_model_dir, pairs_file, straight, *args), check=True, env=ENV, capture_output=True
    )

    proc = subprocess.Popen(
        train_cmd(tiny_model_dir, pairs_file, killed, *args),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "adapter").exists()

    resumed = subprocess.run(
        train_cmd(tiny_model_dir, pairs_file, killed, *args),
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert "resumed from" in resumed.stdout
    assert list(logged(killed)) == list(range(1, 31))
    assert logged(killed) == pytest.approx(logged(straight), rel=1e-5)
    a, b = adapter(straight), adapter(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
    reason="accelerate's launcher is not installed",
)
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, pairs_file, tmp_path):
    """2 processes x batch 2 train as 1 process x batch 4, compared where the arithmetic is deterministic:

    - the loss of every step (rel 1e-5): a process training on the other's share of the step, or a loss
      normalised by each process's own pairs (two means summed: twice the loss), shows here;
    - the gradient's norm before clipping, every step: a gradient scaled by the process count shows only here
      (DDP averages the processes' gradients and the recipe multiplies each loss by the world size; drop
      either, or normalise per process, and the gradient halves or doubles), because AdamW and clipping are
      invariant to the gradient's scale, so neither the weights nor the losses would move;
    - the saved adapters, by the loss they reach on all the pairs (rel 1e-5): the last update is in no logged
      loss. Not element by element: lora_B starts at zero and Adam's first step moves each element by
      lr * g / (|g| + eps), so the few elements whose gradient is ~1e-8 (as small as eps) get a size and sign
      that summation order decides (an all-reduce of two halves vs one batch; the CPU's kernels), up to 2 x
      the summed learning rate apart, while the loss barely feels them (their gradient is ~0).
    """
    from alma_r.models.train.recipe import CPORecipe
    from alma_r.models.train.settings import TrainSettings

    common = ("--max-steps", "3", "--save-steps", "100")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        train_cmd(tiny_model_dir, pairs_file, one, *common, "--per-device-train-batch-size", "4"),
        check=True,
        env=ENV,
        capture_output=True,
    )
    # accelerate launch --cpu starts one process (it expects MPI for more); --multi_gpu uses torchrun, and
    # on a machine without CUDA each process runs on the CPU with the gloo backend.
    launcher = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
    ]
    cmd = train_cmd(tiny_model_dir, pairs_file, two, *common, "--per-device-train-batch-size", "2")
    done = subprocess.run(launcher + cmd[2:], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["pairs_per_step"] == 4

    def records(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in records(two)] == [r["step"] for r in records(one)] == [1, 2, 3]
    assert logged(two) == pytest.approx(logged(one), rel=1e-5)
    norms_one, norms_two = ([r["grad_norm"] for r in records(out)] for out in (one, two))
    # Step 1 comes before any update: only the summation order differs (measured: equal to the last bit).
    # Later steps start from weights that carry the rounding-decided elements above: flipping the sign of
    # lora_B's 16 smallest-gradient elements moved the norm by 5e-5; a scaled gradient moves it by 100%.
    assert norms_two[0] == pytest.approx(norms_one[0], rel=1e-5)
    assert norms_two[1:] == pytest.approx(norms_one[1:], rel=1e-3)

    def loss_on_all_pairs(adapter: Path | None) -> float:
        """CPO's loss (beta 0.1, alpha 1) of the model with `adapter` (none: a new LoRA, which starts as the
        model itself) on all 16 pairs in one batch."""
        pairs = pq.read_table(pairs_file).to_pylist()
        name = adapter.parent.name if adapter else "untrained"
        recipe = CPORecipe(
            TrainSettings(),
            str(tiny_model_dir),
            pairs,
            tmp_path / "loss" / name,
            str(adapter) if adapter else None,
            seed=3,
        ).setup()
        with torch.no_grad():
            return recipe._forward(list(range(len(recipe.examples)))).loss.item()

    trained = loss_on_all_pairs(one / "adapter")
    # Three steps moved this loss by 4e-3 (relative), 400x the tolerance below: agreeing means something.
    assert trained < loss_on_all_pairs(None) * (1 - 1e-3)
    # Flipping the 16 smallest-gradient elements of lora_B moved this loss by 3e-6 (relative).
    assert loss_on_all_pairs(two / "adapter") == pytest.approx(trained, rel=1e-5)


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_shipped_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    from tests.conftest import REPO

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "no"  # alma-r applies bf16 itself, keeping the log-softmax in float32
    assert config.num_processes == 8


def test_missing_columns_fail_with_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c"}]), bad)
    done = subprocess.run(
        train_cmd(tiny_model_dir, bad, tmp_path / "out", "--max-steps", "1"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert f"{bad}: missing column(s) ['rejected']" in done.stderr
