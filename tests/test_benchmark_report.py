"""benchmarks/cpo_vs_trl_report.py's arithmetic: achieved FLOP/s over the same fastest steps as pairs/s (step 1,
the warm-up, left out), MFU against the peak measured in the run, and the targets of the fine-tuning mode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.cpo_vs_trl_report import report, summarise
from benchmarks.measure import matmul_peak


def run(step_seconds, flops, losses, rss, executed=None) -> dict:
    return {
        "step_seconds": step_seconds, "step_other_cpu": [0.0] * len(step_seconds), "flops_per_step": flops,
        "executed_flops_per_step": flops if executed is None else executed,
        "peak_rss_gb": rss, "train_peak_rss_gb": rss, "rss_before_train_gb": 0.1, "peak_cuda_gb": None,
        "train_seconds": sum(step_seconds) + 1, "losses": losses, "trainable": 10, "device": "cpu",
        "torch_threads": 2, "lora_a_checksum": 0.0, "real_tokens_per_step": 100.0,
        "padded_tokens_per_step": 120.0, "quiet_steps": 2, "other_cpu": 0.0, "pairs_per_second": 1.0,
    }  # fmt: skip


def test_flops_per_second_uses_the_fastest_time_of_each_timed_step():
    flops = [7, 100, 300]  # step 1 (warm-up, untimed), steps 2 and 3
    a, b = run([2.0, 1.0], flops, [1.0], 1.0), run([1.0, 3.0], flops, [1.0], 1.0)
    summary = summarise([a, b], batch_size=4)
    # fastest: step 2 took 1.0 (run b), step 3 took 1.0 (run a): 400 FLOPs in 2 s, 8 pairs in 2 s
    assert summary["flops_per_second"] == pytest.approx(200.0)
    assert summary["pairs_per_second"] == pytest.approx(4.0)
    executed = summarise([run([2.0, 1.0], flops, [1.0], 1.0, executed=[7, 50, 150])], batch_size=4)
    assert executed["executed_flops_per_second"] == pytest.approx(200 / 3)  # 200 FLOPs in 3 s


@pytest.mark.parametrize("finetune,target", [("lora", ">= 2.5"), ("full", ">= 2.0")])
def test_the_table_gives_mfu_against_the_measured_peak_and_the_modes_targets(finetune, target):
    args = SimpleNamespace(
        batch_size=4, device="cpu", dtype="float32", finetune=finetune, lora_targets="down_proj", steps=3,
        repeats=1, gradient_checkpointing=False, peak_tflops=None, ours_set=[],
    )  # fmt: skip
    size = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    ours = run([1.0, 1.0], [0, 4e9, 4e9], [2.0, 1.5], 1.0, executed=[0, 2e9, 2e9])  # 4 GFLOP/s, 2 executed
    trl = run([2.0, 2.0], [0, 4e9, 4e9], [2.0, 1.5], 3.0)  # 2 GFLOP/s
    text = report(args, size, [ours], [trl], {"params": 1e6, "vocab": 10}, 16, peak=8e9)
    rows = [line for line in text.splitlines() if line.startswith("| ours") or line.startswith("| TRL")]
    # model GFLOP/s, MFU, executed GFLOP/s, executed MFU
    assert [r.split("|")[3:7] for r in rows] == [
        [" 4 ", " 50.0% ", " 2 ", " 25.0% "],
        [" 2 ", " 25.0% ", " 2 ", " 25.0% "],
    ]
    assert f"pairs/s x2.00 (target {target}" in text and "matmul peak measured in this run" in text


def test_the_measured_matmul_peak_is_a_positive_rate():
    assert matmul_peak("float32", size=256, repeats=2) > 1e6


def test_the_memory_floor_counts_weights_gradients_and_adamw_state():
    from benchmarks.cpo_vs_trl_report import memory_floor_gb

    gib = 2**30
    full = memory_floor_gb(gib, gib, "float32", lora=False)  # 4 + 4 + 8 bytes a parameter
    assert (full["weights"], full["gradients"], full["optimizer"], full["total"]) == (4, 4, 8, 16)
    lora = memory_floor_gb(gib, gib // 4, "bfloat16", lora=True)  # bf16 base + float32 adapter
    assert lora["weights"] == 2 + 1 and lora["total"] == 3 + 1 + 2
