"""The learning check's tables: the ablation (mean ± standard deviation over seeds), the per-seed details and
the decoding comparison, as markdown."""

from __future__ import annotations

import statistics

from alma_r.experiments.learning_check import LABELS, SYSTEMS, SeedResult

COLUMNS = [
    ("exact_match", "exact match"),
    ("adjective_kept", "adjectives kept"),
    ("adverb_kept", "adverbs kept"),
    ("exact_match_no_adjective", "exact match, no adjective"),
    ("oracle", "oracle score"),
]


def _mean_spread(values: list[float]) -> str:
    """Mean ± sample standard deviation over seeds (± 0 for one seed)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


def ablation_table(results: list[SeedResult]) -> str:
    """The markdown table: one row per system, mean ± spread over the seeds; with the preference rows' gain
    in mean log-prob margin (chosen - rejected) over their pairs, when they were measured."""
    rows = ["references", *[s for s in SYSTEMS if s in results[0].metrics]]
    columns = list(COLUMNS)
    if any("pair_margin_gain" in m for m in results[0].metrics.values()):
        columns.append(("pair_margin_gain", "pair margin gain"))
    lines = [
        "| system | " + " | ".join(label for _, label in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for system in rows:
        cells = [
            _mean_spread([r.metrics[system][key] for r in results])
            if key in results[0].metrics[system]
            else "–"
            for key, _ in columns
        ]
        lines.append(f"| {LABELS[system]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decoding_table(results: list[SeedResult]) -> str:
    """The SFT and CPO models decoded four ways (learning_check_decoding.py), mean ± spread over the seeds; empty
    when the comparison did not run."""
    keys = list(results[0].decoding)
    if not keys:
        return ""
    columns = [c for c in COLUMNS if c[0] in ("exact_match", "adjective_kept", "adverb_kept", "oracle")]
    lines = [
        "| model | decoding | " + " | ".join(label for _, label in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for key in keys:
        model, decoding = key.split(" ", 1)
        cells = [_mean_spread([r.decoding[key][k] for r in results]) for k, _ in columns]
        lines.append(f"| {LABELS[model]} | {decoding} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(results: list[SeedResult]) -> str:
    """Selection, exact match and the test's bars per seed (tests/test_learning_check.py: CPO keeps > 0.9 of the
    adjectives and >= 0.95 exact match without one, SFT < 0.3): the spread of the means is often one bad seed."""
    systems = [s for s in SYSTEMS if s in results[0].metrics]
    header = ["seed", "pairs", "chosen = reference", "dropped (ties)"]
    header += [f"{LABELS[s].split(' (')[0]} exact match" for s in systems]
    header += ["SFT adjectives kept", "CPO adjectives kept", "CPO exact match, no adjective", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in results:
        cells = [
            str(r.seed),
            str(len(r.pairs)),
            f"{r.chosen_from_reference:.2f}",
            str(sum(r.dropped.values())),
        ]
        cells += [f"{r.metrics[s]['exact_match']:.3f}" for s in systems]
        cells += [
            f"{r.metrics['sft']['adjective_kept']:.3f}",
            f"{r.metrics['cpo']['adjective_kept']:.3f}",
            f"{r.metrics['cpo']['exact_match_no_adjective']:.3f}",
            f"{sum(r.seconds.values()):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
