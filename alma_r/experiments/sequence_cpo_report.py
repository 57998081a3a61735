"""The tables of `alma-r sequence-cpo` (alma_r/experiments/sequence_cpo_check.py) and the section of
docs/sequence-cpo.md it writes: one row per model, means (± standard deviation) over the seeds, the CPO training
curves' ends, and each CPO row against continued MLE, computed from the same numbers so that the prose can never
disagree with the table. `parse_table` reads a written table back.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from alma_r.data.files import write_text_atomic
from alma_r.experiments.learning_check_doc import machine

if TYPE_CHECKING:
    from alma_r.experiments.sequence_cpo_check import CheckSizes, SeedResult

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "sequence-cpo.md"

LABELS = {
    "start": "MLE, stopped early (the starting model, pi_ref)",
    "mle": "continued MLE",
    "bn": "CPO BN (4 batch negatives)",
    "mn": "CPO MN (4 meanfield negatives)",
    "tn": "CPO TN (4 truncation negatives)",
    "mixn": "CPO MixN (3 BN + 5 MN + 3 TN)",
    "bnr": "CPO BNR (BN + ranking)",
    "mnr": "CPO MNR (MN + ranking)",
    "tnr": "CPO TNR (TN + ranking)",
    "mixnr": "CPO MixNR (MixN + ranking)",
    "an": "CPO AN (4 autoregressive negatives, top-k 50)",
    "anr": "CPO ANR (AN + ranking)",
}
COLUMNS = [
    ("exact_match", "exact match"),
    ("oracle", "oracle score"),
    ("nll_greedy", "NLL eq. 10, greedy"),
    ("nll_samples", "NLL eq. 10, samples"),
    ("reverse_kl", "reverse-KL eq. 9"),
    ("truncation_margin", "log pi(y) - log pi(TN)"),
]


def row_label(row: str) -> str:
    if row.startswith("wise:"):
        _, run, alpha = row.split(":")
        return f"WiSE-FT alpha {alpha} x start + {1 - float(alpha):.2f} x {run_short(run)}"
    return LABELS[row]


def run_short(run: str) -> str:
    return LABELS[run].split(" (")[0].removeprefix("CPO ")


def table(results: list[SeedResult]) -> str:
    """Markdown: one row per model, mean (± standard deviation when several seeds) over the seeds."""
    rows = list(results[0].metrics)
    lines = ["| model | " + " | ".join(label for _, label in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            values = [r.metrics[row][key] for r in results]
            cell = f"{statistics.fmean(values):.3f}"
            if len(values) > 1:
                cell += f" ± {statistics.stdev(values):.3f}"
            cells.append(cell)
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, dict[str, float]]:
    """The results table of a doc written by render_section, read back: label -> column label -> mean. Only the
    section between this check's markers is read (the page holds other tables before it)."""
    if START in text:
        text = text.split(START, 1)[1].split(END, 1)[0]
    out, header = {}, None
    for line in text.splitlines():
        if header is None:
            if line.startswith("| model |"):
                header = [c.strip() for c in line.strip().strip("|").split("|")][1:]
            continue
        if not line.startswith("|"):
            break  # the end of the table
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not set(cells[0]) <= {"-"}:
            out[cells[0]] = {h: float(c.split(" ± ")[0]) for h, c in zip(header, cells[1:], strict=True)}
    return out


BETTER = {
    "exact_match": 1,
    "oracle": 1,
    "nll_greedy": -1,
    "nll_samples": -1,
    "reverse_kl": -1,
    "truncation_margin": 1,
}


def comparisons(results: list[SeedResult]) -> list[str]:
    """Each CPO row against continued MLE, in the numbers of the table (means over seeds): written by the
    command, so the prose below the table can never disagree with it."""
    mean = lambda row, key: statistics.fmean(r.metrics[row][key] for r in results)  # noqa: E731
    rows = [r for r in results[0].metrics if r not in ("start", "mle")]
    if "mle" not in results[0].metrics:
        return []
    lines = []
    for row in rows:
        better = [label for key, label in COLUMNS if BETTER[key] * (mean(row, key) - mean("mle", key)) > 0]
        worse = [label for key, label in COLUMNS if BETTER[key] * (mean(row, key) - mean("mle", key)) < 0]
        delta = mean(row, "exact_match") - mean("mle", "exact_match")
        lines.append(
            f"- {row_label(row)}: exact match {delta:+.3f} vs continued MLE; better on "
            f"{', '.join(better) or 'nothing'}; worse on {', '.join(worse) or 'nothing'}."
        )
    return lines


def training_table(results: list[SeedResult]) -> str:
    keys = [
        ("loss_first", "loss, step 1"),
        ("loss_last", "loss, last step"),
        ("accuracy_last", "ground truth on top, last step"),
        ("logp_gt_first", "log pi(ground truth), step 1"),
        ("logp_gt_last", "log pi(ground truth), last step"),
    ]
    lines = ["| CPO row | " + " | ".join(k[1] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for row in results[0].training:
        cells = [f"{statistics.fmean(r.training[row][k] for r in results):.3f}" for k, _ in keys]
        lines.append(f"| {row_label(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


START, END = "<!-- sequence-cpo:start -->", "<!-- sequence-cpo:end -->"

DOC_HEADER = """# Sequence-level CPO with synthetic negatives: a measured check

`alma-r sequence-cpo` runs the experiment of "Sequence-level Large Language Model Training with Contrastive
Preference Optimization" (anonymous ACL submission, section 5) at toy scale, on the synthetic translation task
of the learning check (`models/synthetic.py`) with CLEAN references (no flawed ones): the ground truth is the
correct translation, so "better" means closer to it. The section between the markers below is rewritten by the
command; the interpretation after it is written by hand from those numbers.
"""


def render_section(results: list[SeedResult], sizes: CheckSizes, command: str, seconds: float) -> str:
    s = sizes
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results[0].seconds.items())
    return f"""{START}
## Design (as run)

- Start: a tiny LLaMA (width 128, 2 layers) trained with MLE (`CPORecipe`, loss `sft`) on {s.train_sentences}
  clean references for {s.mle_steps} steps x {s.mle_batch} (lr {s.mle_lr} cosine): stopped early on purpose.
  It is the reference model pi_ref of every CPO row and the starting point of every row.
- Rows: from the start, {s.steps} steps x {s.batch} examples drawn from {s.continue_sources} other sources,
  AdamW lr {s.lr} constant, weight decay {s.weight_decay}: continued MLE (NLL of the reference), or
  sequence-level CPO (`models/sequence/trainer.py`, beta {s.beta}, no NLL term) with 4 negatives of one kind
  (BN, MN, TN, AN; the paper's table 1) or MixN = 3 BN + 5 MN + 3 TN (the paper's 11); AN = top-k 50
  samples of the starting model, 4 per source, generated offline with `generate_translations` into
  CANDIDATES Parquet files and read back (a sample equal to the reference is not used as its negative while
  another is left). R = with the ranking
  signal (Plackett-Luce, eq. 8; ranked by cosine similarity of the starting model's mean-pooled hidden
  states), else best-of-K (eq. 7). MN resamples {s.meanfield_share:.0%} of the positions (round half up, at
  least 1) from the starting model's next-token distribution, never keeping the original token.
- WiSE-FT: alpha x start (the MLE model) + (1 - alpha) x the CPO weights (`models/sequence/wise_ft.py`).
- Evaluation on {s.test_sources} held-out sources: greedy translations against the rule-based translation
  (exact match; oracle score = 1 - word edit distance / length). Under the scorer P-hat, a larger model (width
  {s.scorer_hidden}, {s.scorer_layers} layers) trained longer ({s.scorer_steps} steps x {s.mle_batch}) on the
  same clean data (cached): the length-normalised NLL of eq. 10, of the greedy outputs and of
  {s.samples_per_source} samples per source (temperature 1, no top-k), and the reverse-KL of eq. 9, a Monte
  Carlo mean of log Q(y|x) - log P-hat(y|x) over those samples (`models/sequence/metrics.py`). Lower is
  better for both. Last column: the mean over sources and every truncation of the reference of
  log pi(y) - log pi(prefix + EOS), the margin TN negatives train (higher = the full translation is preferred
  more strongly to its truncations).

## Results

- Command: `{command}` ({len(results)} seed(s): {", ".join(str(r.seed) for r in results)}; {seconds / 60:.1f} min)
- Machine: {machine()}
- Seconds (seed {results[0].seed}): {timing}

{table(results)}

CPO training (from each row's metrics.jsonl, mean over seeds; batch of the step, before its update):

{training_table(results)}

Against continued MLE (computed by the command from the table):

{chr(10).join(comparisons(results))}
{END}"""


def update_doc(path: Path, section: str) -> Path:
    """Replace the generated section between its markers (or start the doc); the hand-written rest stays."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else DOC_HEADER
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    return write_text_atomic(path, text)
