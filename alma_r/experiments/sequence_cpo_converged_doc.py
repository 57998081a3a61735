"""The section of docs/sequence-cpo.md that `alma-r sequence-cpo-converged --write-doc` writes (between its own
markers; the rest of the page, the earlier early-stopped check included, stays): the design as run, the table of
mean ± sd over seeds, the MLE plateaus, the learning-rate grid and what each row chose. `parse_table` reads the
table back."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from alma_r.data.files import write_text_atomic
from alma_r.experiments.learning_check_doc import machine
from alma_r.experiments.sequence_cpo_report import COLUMNS as CHECK_COLUMNS
from alma_r.experiments.sequence_cpo_report import LABELS as CHECK_LABELS

if TYPE_CHECKING:
    from alma_r.experiments.sequence_cpo_converged import ConvergedSizes, SeedRun

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "sequence-cpo.md"
START, END = "<!-- sequence-cpo-converged:start -->", "<!-- sequence-cpo-converged:end -->"
LABELS = CHECK_LABELS | {"start": "MLE at its plateau (the starting model, pi_ref)"}
COLUMNS = [*CHECK_COLUMNS, ("win_rate", "win rate vs ground truth")]


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: list[SeedRun]) -> str:
    lines = ["| model | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row in runs[0].metrics:
        cells = [_cell([r.metrics[row][key] for r in runs]) for key, _ in COLUMNS]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, dict[str, float]]:
    """label -> column -> mean, from the written section."""
    section = text.split(START, 1)[1].split(END, 1)[0]
    labels = [label for _, label in COLUMNS]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in LABELS.values() and len(cells) == len(labels) + 1:
            out[cells[0]] = {lab: float(c.split(" ± ")[0]) for lab, c in zip(labels, cells[1:], strict=True)}
    return out


def grid_table(runs: list[SeedRun], sizes: ConvergedSizes) -> str:
    """Per row: the validation oracle score of each learning rate (mean over seeds) and each seed's choice."""
    head = " | ".join(f"lr {lr:g}" for lr in sizes.lr_grid)
    lines = [f"| row | {head} | chosen (seed {', '.join(str(r.seed) for r in runs)}) |",
             "|---|" + "---|" * (len(sizes.lr_grid) + 1)]  # fmt: skip
    for row in runs[0].chosen_lr:
        cells = [_cell([r.validation[row][lr] for r in runs]) for lr in sizes.lr_grid]
        chosen = ", ".join(f"{r.chosen_lr[row]:g}" for r in runs)
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def render_section(runs: list[SeedRun], sizes: ConvergedSizes, command: str, seconds: float) -> str:
    c = sizes.check
    plateaus = ", ".join(
        f"seed {r.seed}: step {r.plateau_step} (NLL {dict(r.nll_curve)[r.plateau_step]:.4f}; curve "
        + " ".join(f"{step}:{nll:.3f}" for step, nll in r.nll_curve)
        + ")"
        for r in runs
    )
    return f"""{START}
## The paper's protocol: from a converged MLE model (as run)

- MLE: a tiny LLaMA (width 128, 2 layers) trained with next-token prediction on {sizes.train_sentences} clean
  references, batch {sizes.mle_batch}, constant lr {sizes.mle_lr:g}, its validation NLL and a copy of its weights every {sizes.mle_eval_every} steps up
  to {sizes.mle_max_steps}; the model is the checkpoint where the validation NLL ({sizes.validation_sources} held-out
  sources, eq. 10 of the references under the model itself) stopped improving: no gain above {sizes.plateau_tol:g}
  nats per token for {sizes.plateau_patience} evaluations in a row. Plateaus: {plateaus}.
- Rows, each from that model, {sizes.steps} steps x {sizes.batch} examples on {sizes.continue_sources} other
  sources (each once), AdamW constant lr, weight decay {c.weight_decay}: continued MLE, or sequence-level CPO
  (beta {c.beta}, no NLL term) with 4 negatives of one kind or MixN = 3 BN + 5 MN + 3 TN, MN drawn from the
  policy at each step (`negatives.mn_source: policy`, the paper's pi_theta) resampling {c.meanfield_share:.0%} of
  the positions, AN = 4 top-k 50 samples of the starting model; R = Plackett-Luce ranking (eq. 8).
- Learning rate per row: each of {", ".join(f"{lr:g}" for lr in sizes.lr_grid)}, trained in full, and the one
  with the best oracle score of greedy outputs on the validation sources kept (ties: the smaller). The table
  below the results gives every validation score.
- Test: {sizes.test_sources} other held-out sources. Columns as in the early-stopped check below, plus the win rate
  of greedy outputs against the ground truth through the judge code path (`models/evaluate/judge.py`: both answer
  orders, item score 1 / 0.5 / 0, Wilson interval) with the oracle as the judge (the higher oracle score wins;
  equal scores answer "A", which the two orders turn into a tie). The ground truth is the correct translation, so
  a model can at best tie it: 0.5 = every output as good as the reference.

## Results (converged MLE)

- Command: `{command}` ({len(runs)} seeds: {", ".join(str(r.seed) for r in runs)}; {seconds / 60:.1f} min)
- Machine: {machine()}

{table(runs)}

Validation oracle score by learning rate (mean over seeds) and the learning rate each seed chose:

{grid_table(runs, sizes)}
{END}"""


def update_doc(path: Path, section: str) -> Path:
    """Replace this protocol's section between its markers, or put it first after the page's introduction."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        head, sep, rest = text.partition("<!-- sequence-cpo:start -->")
        text = head + section + "\n\n" + sep + rest
    return write_text_atomic(path, text)
