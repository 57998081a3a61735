"""Where a training step of our CPO engine spends its time: torch.profiler over a few steps of the benchmark's setup
(benchmarks/cpo_vs_trl.py: the same model, pairs, order and settings), the top operators by self time, and on a
GPU how much of the step's wall time its kernels kept the device busy and how often the host waited for it.

    .venv/bin/python benchmarks/profile_step.py --dtype bfloat16 --finetune lora
    python3 benchmarks/profile_step.py --device cuda --dtype bfloat16 --model-size 1b --trace /tmp/step.json

Written for the GPU gap of docs/benchmarks.md (TRL faster on an H200, CPU-bound steps suspected): the host-side
share and the synchronisations are what that question needs; `--trace` writes a Chrome trace to look at.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# beside this script: its folder is first on sys.path
from cpo_vs_trl import CACHE, SIZES, our_settings, prepare
from cpo_vs_trl_report import cpu_model

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync", "aten::item")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--finetune", choices=("lora", "full"), default="lora")
    p.add_argument("--model-size", choices=tuple(SIZES), default="small")
    p.add_argument("--lora-targets", default="down_proj")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3, help="steps run before profiling")
    p.add_argument("--steps", type=int, default=4, help="steps profiled")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE", help="a train setting")
    p.add_argument("--rows", type=int, default=25, help="operators listed per table")
    p.add_argument("--trace", type=Path, default=None, help="also write a Chrome trace here")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("ALMA_DATA"),
                   required="ALMA_DATA" not in os.environ, help="ALMA's data folder (default $ALMA_DATA)")  # fmt: skip
    args = p.parse_args()
    args.pairs_file = None

    import torch
    from torch.profiler import ProfilerActivity, profile

    from alma_r.models.train.recipe import CPORecipe

    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the recipe picks CUDA whenever it sees one
    CACHE.mkdir(parents=True, exist_ok=True)
    steps, args.steps = args.steps, args.warmup + args.steps  # prepare() and our_settings(): the run's length
    model_path, pairs, _, _ = prepare(args)
    with tempfile.TemporaryDirectory(prefix="cpo-profile-") as work:
        recipe = CPORecipe(our_settings(args), str(model_path), pairs, Path(work), seed=0, dtype=args.dtype)
        recipe = recipe.setup()
        recipe.model.train()
        cuda = recipe.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def step():
            recipe._train_step(recipe._step_indices(recipe.step))
            recipe._optimizer_step()

        for _ in range(args.warmup):
            step()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        walls = []
        with profile(activities=activities) as prof:
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                sync()
                walls.append(time.perf_counter() - t0)
    events = prof.key_averages()
    wall_us = sum(walls) * 1e6
    print(f"machine: {cpu_model()}; device {recipe.device}; torch {torch.__version__}")
    print(f"setup: {args.model_size} LLaMA, {args.finetune}, {args.dtype}, batch {args.batch_size}, "
          f"recompute {recipe.recompute}; {steps} steps profiled after {args.warmup}")  # fmt: skip
    print(f"step wall seconds: {', '.join(f'{w:.3f}' for w in walls)} (mean {sum(walls) / len(walls):.3f})")
    if cuda:
        busy = sum(e.self_device_time_total for e in events if e.self_device_time_total > 0)
        print(
            f"GPU kernels busy: {busy / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall ({100 * busy / wall_us:.0f}%)"
        )
    counts = {e.key: e.count for e in events if e.key in SYNCS}
    print("host waits and copies per step: "
          + (", ".join(f"{k} {v / steps:.1f}" for k, v in counts.items()) or "none recorded"))  # fmt: skip
    print("\nby self CPU time (the host's work):")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if cuda:
        print("\nby self GPU time:")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        print(f"Chrome trace: {args.trace}")


if __name__ == "__main__":
    main()
