"""What the benchmarks measure, each the same way for every engine: peak RSS (VmHWM, reset before train()), the
machine's busy CPU seconds (to see other processes), a timestamp per optimizer step, and the machine's matmul peak
for a dtype (the denominator of MFU).

Imported by cpo_vs_trl.py, which runs from this folder (`.venv/bin/python benchmarks/cpo_vs_trl.py`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (all processes, all cores), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def stamp() -> tuple[float, float, float]:
    """(wall clock, machine busy CPU seconds, this process's CPU seconds), taken at the end of each step."""
    return time.perf_counter(), machine_busy_seconds(), time.process_time()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that the next read is the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(args, model, train, ends: list[tuple]) -> dict:
    import resource

    import torch

    cuda = args.device == "cuda"
    # LoRA A is random (B is zero): equal sums mean both engines start from the same adapter.
    lora_a_checksum = float(
        sum(p.detach().float().sum() for n, p in model.named_parameters() if "lora_A" in n)
    )
    setup_peak_kb, rss_before_kb = proc_status_kb("VmHWM"), proc_status_kb("VmRSS")
    reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu0, busy0 = resource.getrusage(resource.RUSAGE_SELF), machine_busy_seconds()
    t0 = time.perf_counter()
    train()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu1, busy1 = resource.getrusage(resource.RUSAGE_SELF), machine_busy_seconds()
    own_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    train_peak_kb = proc_status_kb("VmHWM")
    steady = ends[-1][0] - ends[0][0] if len(ends) > 1 else float("nan")
    # Steps 2..N: wall seconds, and CPU s/s that other processes took meanwhile (0 on a quiet machine).
    intervals = list(zip(ends, ends[1:], strict=False))
    step_seconds = [b[0] - a[0] for a, b in intervals]
    step_other = [max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]) for a, b in intervals]
    return {
        "train_seconds": wall,
        "steady_seconds": steady,
        "step_ends": [e[0] - t0 for e in ends],
        "step_seconds": step_seconds,
        "step_other_cpu": step_other,
        "pairs_per_second": (len(ends) - 1) * args.batch_size / steady,
        "pairs_per_second_incl_first": len(ends) * args.batch_size / wall,
        "peak_rss_gb": max(setup_peak_kb, train_peak_kb) / 2**20,
        "train_peak_rss_gb": train_peak_kb / 2**20 if reset else None,
        "rss_before_train_gb": rss_before_kb / 2**20,
        "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "lora_a_checksum": lora_a_checksum,
        # CPU seconds per wall second in train(): about the thread count when nothing else competes for the cores
        "cpu_utilisation": own_cpu / wall,
        # CPU seconds per wall second that other processes took during train(): ~0 on a quiet machine
        "other_cpu": max(0.0, (busy1 - busy0) - own_cpu) / wall,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }


def matmul_peak(dtype: str, device: str = "cpu", size: int = 2048, repeats: int = 10) -> float:
    """The machine's dense matmul rate in FLOP/s for `dtype` on `device`, with torch's current thread count: the
    best of `repeats` timed `size` x `size` torch.matmul calls (2·size³ FLOPs each) after two warm-up calls.
    On CPUs bfloat16 takes AMX or AVX-512-BF16 kernels where the CPU has them, else a slow emulation."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
