"""Exact resume on the GPU: CPO on a LoRA with dropout, killed after a checkpoint and resumed in a new process,
against the same run uninterrupted. Dropout draws from the CUDA generator, so the resume is exact only if the
checkpoint restores the CUDA RNG state (models/train/checkpoints.py) next to the CPU one.

    python3 scripts/gpu_resume_check.py --out resume.json            # CUDA, bfloat16 when there is a GPU
    python3 scripts/gpu_resume_check.py --device cpu --out r.json    # the same check on the CPU (seconds)

Writes {device, dtype, torch, steps, per-step losses of both runs, largest adapter difference, exact}; exits 1
when the resumed run differs from the uninterrupted one. Part of scripts/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS, SAVE_STEPS, KILL_AT = 8, 4, 6  # killed inside step 6, after the step-4 checkpoint


def pairs() -> list[dict]:
    """Chosen = the rule-based translation, rejected = the flawed reference, of the learning check's task."""
    from alma_r.models import synthetic

    task = synthetic.make_task(seed=0, n_train=0, n_preference=512, n_test=0)
    rows = [
        {"prompt": s.prompt, "chosen": synthetic.rule_translation(s.src), "rejected": s.ref}
        for s in task.preference
    ]
    return [r for r in rows if r["chosen"] != r["rejected"]]


def recipe(model_dir: Path, out_dir: Path, dtype: str):
    from alma_r.models.train.recipe import CPORecipe
    from alma_r.models.train.settings import TrainSettings

    settings = TrainSettings(
        max_steps=STEPS,
        save_steps=SAVE_STEPS,
        logging_steps=1,
        batch_size=16,
        learning_rate=1e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_prompt_length=64,
        max_length=128,
        lora={"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        disable_dropout=False,  # the dropout masks are what an exact resume must replay
    )
    return CPORecipe(settings, str(model_dir), pairs(), out_dir, seed=3, dtype=dtype)


def phase(args) -> None:
    """One training process: `straight` to the end, `killed` dies inside step KILL_AT, `resumed` continues."""
    import torch

    # Two runs can only be compared bit for bit if each is deterministic (CUDA's atomics-based kernels are not).
    torch.use_deterministic_algorithms(True, warn_only=True)
    r = recipe(args.model, args.run, args.dtype).setup()
    if args.phase == "killed":
        real_loss = r._loss

        def loss_then_die(*a, **kw):
            if r.step == KILL_AT - 1:
                os._exit(9)  # as a SIGKILL would: no cleanup, no save
            return real_loss(*a, **kw)

        r._loss = loss_then_die
    r.train()
    r.save(args.run / "adapter")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is a GPU"
    )
    p.add_argument("--phase", choices=("straight", "killed", "resumed"), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        phase(args)
        return 0

    import torch
    from safetensors.torch import load_file

    from alma_r.models import synthetic

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device == "cuda" else "float32"
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # deterministic cuBLAS
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory(prefix="alma-r-resume-check-") as tmp:
        model = synthetic.build_model(
            Path(tmp) / "model", seed=0, hidden_size=256, layers=4, intermediate_size=512
        )

        def run(name: str, which: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, __file__, "--out", str(args.out), "--phase", which]
            cmd += ["--model", str(model), "--run", str(Path(tmp) / name), "--dtype", dtype]
            return subprocess.run(cmd, env=env, capture_output=True, text=True)

        straight = run("straight", "straight")
        killed = run("interrupted", "killed")
        resumed = run("interrupted", "resumed")
        if straight.returncode or resumed.returncode or killed.returncode != 9:
            print(straight.stderr[-2000:], killed.stderr[-2000:], resumed.stderr[-2000:], sep="\n---\n")
            return 1
        a = load_file(Path(tmp) / "straight" / "adapter" / "adapter_model.safetensors")
        b = load_file(Path(tmp) / "interrupted" / "adapter" / "adapter_model.safetensors")
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        summary = json.loads((Path(tmp) / "interrupted" / "train_summary.json").read_text())
        result = {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "dtype": dtype,
            "torch": torch.__version__,
            "steps": STEPS,
            "resumed_from": summary.get("resumed_from"),
            "losses_straight": losses(Path(tmp) / "straight"),
            "losses_resumed": losses(Path(tmp) / "interrupted"),
            "largest_adapter_difference": diff,
        }
        result["exact"] = diff == 0.0 and result["losses_straight"] == result["losses_resumed"]
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["exact"] and result["resumed_from"] == SAVE_STEPS else 1


if __name__ == "__main__":
    sys.exit(main())
