"""The report of benchmarks/cpo_vs_trl.py: each engine's repeats summarised, then one markdown table comparing
this repo's CPO engine with TRL's CPOTrainer (throughput, memory, per-step losses).

Imported by cpo_vs_trl.py, which runs from this folder (`.venv/bin/python benchmarks/cpo_vs_trl.py`).
"""

from __future__ import annotations

from pathlib import Path

QUIET = 0.1  # a step is "quiet" when other processes took under this many CPU s/s while it ran
# ours/TRL targets of issue 17 (pairs/s at least, peak RSS at most), by fine-tuning mode
TARGETS = {"lora": (2.5, 0.4), "full": (2.0, 0.5)}


def cpu_model() -> str:
    """The CPU's model name and the instruction sets that decide its matmul kernels."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def summarise(runs: list[dict], batch_size: int) -> dict:
    """One engine over its repeats. Steps 2..N of every run train on the same pairs, so each step's fastest
    time over the repeats is its least disturbed one; pairs/s = pairs of steps 2..N / the sum of those times.
    Memory is the largest over the repeats (it barely varies); the losses are the same in every run."""
    n = min(len(r["step_seconds"]) for r in runs)
    best = [min(range(len(runs)), key=lambda i, k=k: runs[i]["step_seconds"][k]) for k in range(n)]
    seconds = [runs[i]["step_seconds"][k] for k, i in enumerate(best)]
    quiet = sum(runs[i]["step_other_cpu"][k] < QUIET for k, i in enumerate(best))
    first = runs[0]
    return {
        **first,
        "pairs_per_second": n * batch_size / sum(seconds),
        "quiet_steps": quiet,
        "timed_steps": n,
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "train_peak_rss_gb": max(r["train_peak_rss_gb"] or 0 for r in runs) or None,
        "rss_before_train_gb": max(r["rss_before_train_gb"] for r in runs),
        "peak_cuda_gb": max(r["peak_cuda_gb"] for r in runs) if first["peak_cuda_gb"] is not None else None,
        # steps 2..N of the fastest times: flops_per_step[0] is step 1, the warm-up
        "flops_per_second": sum(first["flops_per_step"][1 : n + 1]) / sum(seconds),
        "executed_flops_per_second": sum(first["executed_flops_per_step"][1 : n + 1]) / sum(seconds),
        "train_seconds": min(r["train_seconds"] for r in runs),
    }


def memory_floor_gb(params: int, trainable: int, dtype: str, lora: bool) -> dict[str, float]:
    """What training must hold whatever the engine: the base weights in the run's dtype (plus the LoRA weights,
    float32 in both engines), a gradient and AdamW's two moments per trainable parameter (float32)."""
    base = params * (2 if dtype == "bfloat16" else 4)
    out = {
        "weights": base + (trainable * 4 if lora else 0),
        "gradients": trainable * 4,
        "optimizer": trainable * 8,
    }
    out = {k: v / 2**30 for k, v in out.items()}
    return out | {"total": sum(out.values())}


def report(
    args, size: dict, ours_runs: list[dict], trl_runs: list[dict], meta: dict, n_pairs: int, peak: float
) -> str:
    """The markdown report: setup, one table row per engine, the ratios against the targets, per-step losses.
    `size` is the model's LLaMA shape (SIZES[args.model_size] of cpo_vs_trl.py); `peak` the matmul FLOP/s
    measured in the same run (measure.matmul_peak), MFU's denominator."""
    ours, trl = summarise(ours_runs, args.batch_size), summarise(trl_runs, args.batch_size)
    cuda = args.device == "cuda"
    lines = [
        f"model: LLaMA {meta['params'] / 1e6:.1f}M parameters (hidden {size['hidden_size']}, "
        f"{size['num_hidden_layers']} layers, {size['num_attention_heads']} heads, intermediate "
        f"{size['intermediate_size']}, vocab {meta['vocab']}, untied); "
        + (f"LoRA r=16 alpha=32 on {args.lora_targets}" if args.finetune == "lora" else "full fine-tuning")
        + f": {ours['trainable']:,} trainable",
        f"machine: {cpu_model()}; matmul peak measured in this run ({args.dtype}, 2048 x 2048 torch.matmul, "
        f"{ours['torch_threads']} threads): {peak / 1e9:.0f} GFLOP/s"
        + (f"; datasheet peak given: {args.peak_tflops} TFLOP/s" if args.peak_tflops else ""),
        f"data: {n_pairs} WMT'22 pairs (de-en, en-de), chosen = ALMA-13B-R, rejected = reference; "
        f"{args.steps} steps x {args.batch_size} pairs, {args.repeats} run(s) per engine; device {args.device} "
        f"({ours['device']}), {args.dtype}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
        f"torch threads {ours['torch_threads']}"
        + (f"; our engine with {', '.join(args.ours_set)}" if args.ours_set else ""),
        f"LoRA A init checksum: ours {ours['lora_a_checksum']:.6f}, TRL {trl['lora_a_checksum']:.6f} "
        f"({'identical start' if abs(ours['lora_a_checksum'] - trl['lora_a_checksum']) < 1e-6 else 'different'})",
        "",
        "| engine | pairs/s | model GFLOP/s | MFU | executed GFLOP/s | executed MFU | peak RSS GB | final loss "
        "| first-step loss | RSS before train() GB | train() peak RSS GB | tokens/step real / padded | quiet steps |"
        + (" peak CUDA GB | MFU (datasheet) |" if cuda else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""),
    ]
    for name, r in (("ours (CPORecipe)", ours), ("TRL CPOTrainer", trl)):
        tp = r["train_peak_rss_gb"]
        row = (
            f"| {name} | {r['pairs_per_second']:.2f} | {r['flops_per_second'] / 1e9:.0f} "
            f"| {100 * r['flops_per_second'] / peak:.1f}% | {r['executed_flops_per_second'] / 1e9:.0f} "
            f"| {100 * r['executed_flops_per_second'] / peak:.1f}% | {r['peak_rss_gb']:.2f} | {r['losses'][-1]:.4f} "
            f"| {r['losses'][0]:.4f} | {r['rss_before_train_gb']:.2f} | {'n/a' if tp is None else f'{tp:.2f}'} "
            f"| {r['real_tokens_per_step']:.0f} / {r['padded_tokens_per_step']:.0f} "
            f"| {r['quiet_steps']}/{r['timed_steps']} |"
        )
        if cuda:
            sheet = args.peak_tflops and r["flops_per_second"] / (args.peak_tflops * 1e12)
            mfu = f"{100 * sheet:.1f}%" if sheet else "n/a"
            row += f" {r['peak_cuda_gb']:.2f} | {mfu} |"
        lines.append(row)
    speed = ours["pairs_per_second"] / trl["pairs_per_second"]
    want_speed, want_mem = TARGETS[args.finetune]
    mem = ours["peak_rss_gb"] / trl["peak_rss_gb"]
    extra = []
    if ours["train_peak_rss_gb"] and trl["train_peak_rss_gb"]:
        extra.append(f"train() peak RSS x{ours['train_peak_rss_gb'] / trl['train_peak_rss_gb']:.2f}")
    if cuda:
        extra.append(f"peak CUDA x{ours['peak_cuda_gb'] / trl['peak_cuda_gb']:.2f}")
    floor = memory_floor_gb(meta["params"], ours["trainable"], args.dtype, args.finetune == "lora")
    lines += [
        "",
        "FLOPs on real tokens (benchmarks/flops.py): model = the plain layout's count (both sequences of a pair "
        "with its prompt, the head on every position), the same for both engines; executed = what the engine "
        "itself runs (TRL: the plain layout; ours: each prompt once, the head on completion positions, its recompute).",
        f"memory floor (weights {floor['weights']:.2f} + gradients {floor['gradients']:.2f} + AdamW state "
        f"{floor['optimizer']:.2f} GB = {floor['total']:.2f} GB, activations not included): peak RSS above it "
        f"ours {ours['peak_rss_gb'] - floor['total']:.2f} GB, TRL {trl['peak_rss_gb'] - floor['total']:.2f} GB",
        f"ours/TRL: pairs/s x{speed:.2f} (target >= {want_speed}: {'met' if speed >= want_speed else 'NOT met'}), "
        f"peak RSS x{mem:.2f} (target <= {want_mem}: {'met' if mem <= want_mem else 'NOT met'})"
        + "".join(f", {e}" for e in extra),
        "per run (whole-run pairs/s over steps 2..N, CPU s/s of other processes meanwhile, train() seconds): "
        + "; ".join(
            f"{name} {r['pairs_per_second']:.2f} / {r['other_cpu']:.2f} / {r['train_seconds']:.1f}s"
            for name, rs in (("ours", ours_runs), ("TRL", trl_runs))
            for r in rs
        ),
        "",
        "| step | ours loss | TRL loss | difference |",
        "|---:|---:|---:|---:|",
    ]
    for k, (a, b) in enumerate(zip(ours["losses"], trl["losses"], strict=False), start=1):
        lines.append(f"| {k} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    disturbed = [f"{n}: {r['quiet_steps']}/{r['timed_steps']}" for n, r in (("ours", ours), ("TRL", trl))
                 if r["quiet_steps"] < r["timed_steps"]]  # fmt: skip
    if disturbed and not cuda:
        lines.append(
            f"\nWARNING: other processes used the CPU during some of the fastest steps (quiet steps {', '.join(disturbed)}): "
            "the timings are disturbed; rerun on a quiet machine or with more --repeats."
        )
    return "\n".join(lines)
