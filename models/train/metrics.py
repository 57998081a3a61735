"""What a training run logs: the per-step record written to metrics.jsonl (TRL's metric names), the numbers of
the terminal's progress line, reading the file back, and the training curves drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from alma_r.data.files import save_figure_atomic

# Sums over one optimizer step's micro-batches (and processes), divided by its pair count when logged.
STEP_TOTALS = ("loss", "preference", "nll", "chosen", "rejected", "acc", "logp_c", "logp_r")


def empty_totals() -> dict[str, float]:
    return dict.fromkeys(STEP_TOTALS, 0.0)


def add_micro_batch(totals: dict[str, float], out, logp_c, logp_r) -> None:
    """Add one micro-batch's PreferenceLoss `out` and its chosen/rejected log-probs (B,) to the step's totals.
    The loss terms are already normalised by the whole step, so they add up to the step's loss."""
    totals["loss"] += out.loss.item()
    totals["preference"] += out.preference.item()
    totals["nll"] += out.nll.item()
    totals["chosen"] += out.chosen_rewards.sum().item()
    totals["rejected"] += out.rejected_rewards.sum().item()
    totals["acc"] += (out.chosen_rewards > out.rejected_rewards).float().sum().item()
    totals["logp_c"] += logp_c.sum().item()
    totals["logp_r"] += logp_r.sum().item()


def step_record(
    step: int,
    epoch: float,
    totals: dict[str, float],
    n_pairs: int,
    grad_norm: float,
    learning_rate: float,
    tokens: int,
    seconds: float,
) -> dict:
    """One metrics.jsonl line: the step's losses, mean rewards and log-probs per pair, and its throughput."""
    return {
        "step": step,
        "epoch": epoch,
        "loss": totals["loss"],
        "preference_loss": totals["preference"],
        "nll_loss": totals["nll"],
        "rewards/chosen": totals["chosen"] / n_pairs,
        "rewards/rejected": totals["rejected"] / n_pairs,
        "rewards/margins": (totals["chosen"] - totals["rejected"]) / n_pairs,
        "rewards/accuracies": totals["acc"] / n_pairs,
        "logps/chosen": totals["logp_c"] / n_pairs,
        "logps/rejected": totals["logp_r"] / n_pairs,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate,
        "tokens_per_second": tokens / seconds,
        "pairs_per_second": n_pairs / seconds,
    }


def progress_numbers(totals: dict[str, float], n_pairs: int, with_rejected: bool) -> dict[str, float]:
    """What the terminal's progress line shows of a step (models/progress.py): the loss and, for a preference
    loss, its NLL term and the mean reward margin (chosen - rejected), the first signs of a diverging run."""
    if not with_rejected:  # sft: the loss is the NLL and there is no margin
        return {"loss": totals["loss"]}
    margin = (totals["chosen"] - totals["rejected"]) / n_pairs
    return {"loss": totals["loss"], "nll": totals["nll"], "margin": margin}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (the process was killed mid-write) is ignored."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_curves(metrics_path: Path, out_path: Path, title: str) -> Path | None:
    """Training curves (loss, NLL, reward margin, reward accuracy) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return None
    steps = [r["step"] for r in records]
    keys = [
        ("loss", "total loss"),
        ("nll_loss", "NLL on chosen"),
        ("rewards/margins", "reward margin"),
        ("rewards/accuracies", "reward accuracy"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (key, label) in zip(axes, keys, strict=True):
        ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 30 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure_atomic(fig, out_path)
