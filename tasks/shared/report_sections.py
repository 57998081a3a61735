"""The results sections of a report, shared by the report stage (tasks/report.py) and `alma-r evaluate`: corpus
scores per test set, direction and system with significance daggers, the headline baseline -> CPO table, the
results plots, and the scoring / preference-data / training summaries."""

from __future__ import annotations

import json
from pathlib import Path

from alma_r.data.files import save_figure_atomic


def significance_mark(result: dict, baseline: dict | None) -> str:
    """† when the paired bootstrap finds the difference to the baseline significant. An identical score is
    never marked: sacreBLEU's p-value counts resamples with a larger difference, so 0 vs 0 gets p = 1/(n+1)."""
    p, same = result["p_value"], baseline is not None and result["score"] == baseline["score"]
    return "†" if p is not None and p < SIGNIFICANT and not same else ""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


METRIC_ORDER = ["kiwi_22", "kiwi_xxl", "xcomet_xxl", "comet_22", "bleu", "chrf"]
METRIC_NAMES = {
    "kiwi_22": "KIWI-22",
    "kiwi_xxl": "KIWI-XXL",
    "xcomet_xxl": "XCOMET-XXL",
    "comet_22": "COMET-22",
    "bleu": "BLEU",
    "chrf": "chrF",
}
SIGNIFICANT = 0.05


def ordered_metrics(results: list[dict]) -> list[str]:
    present = {r["metric"] for r in results}
    return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def results_section(results: list[dict]) -> str:
    """Per test set and metric: systems x directions with the gain over the baseline, a dagger where the paired
    bootstrap p-value is below 0.05, and the paper's xx->en / en->xx averages."""
    by = {(r["test_set"], r["lp"], r["system"], r["metric"]): r for r in results}
    out = []
    for test_set in sorted({r["test_set"] for r in results}):
        lps = sorted({r["lp"] for r in results if r["test_set"] == test_set})
        systems = list(dict.fromkeys(r["system"] for r in results if r["test_set"] == test_set))
        n = {
            lp: next(r["n_segments"] for r in results if r["test_set"] == test_set and r["lp"] == lp)
            for lp in lps
        }
        for metric in ordered_metrics([r for r in results if r["test_set"] == test_set]):
            rows = []
            for system in systems:
                cells = [system]
                for lp in lps:
                    r, base = (
                        by.get((test_set, lp, system, metric)),
                        by.get((test_set, lp, "baseline", metric)),
                    )
                    if r is None:
                        cells.append("–")
                        continue
                    mark = significance_mark(r, base)
                    gain = (
                        f" ({r['score'] - base['score']:+.2f})"
                        if base is not None and system != "baseline"
                        else ""
                    )
                    cells.append(f"{r['score']:.2f}{mark}{gain}")
                for side in ("-en", "en-"):  # the paper's two averages: xx->en, then en->xx
                    chosen = [
                        lp for lp in lps if (lp.endswith(side) if side == "-en" else lp.startswith(side))
                    ]
                    vals = [by.get((test_set, lp, system, metric)) for lp in chosen]
                    cells.append(
                        f"{sum(v['score'] for v in vals) / len(vals):.2f}"
                        if chosen and None not in vals
                        else "–"
                    )
                rows.append(cells)
            header = ["system", *[f"{lp} (n={n[lp]})" for lp in lps], "avg xx→en", "avg en→xx"]
            out.append(
                f"### {test_set}: {METRIC_NAMES.get(metric, metric)}\n\n{markdown_table(header, rows)}"
            )
    out.append(
        f"† the difference to `baseline` is significant (paired bootstrap, p < {SIGNIFICANT}); in "
        "parentheses the gain over `baseline`. COMET metrics are segment means x 100."
    )
    signatures = sorted({r["signature"] for r in results})
    out.append("Signatures:\n\n" + "\n".join(f"- `{s}`" for s in signatures))
    return "\n\n".join(out)


def plot_results(results: list[dict], segment_scores: list[dict], out_dir: Path) -> list[Path]:
    """Per-direction bars for each metric, and the distribution of segment chrF per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in ordered_metrics(results):
        rows = [r for r in results if r["metric"] == metric]
        groups = sorted({(r["test_set"], r["lp"]) for r in rows})
        systems = list(dict.fromkeys(r["system"] for r in rows))
        by = {(r["test_set"], r["lp"], r["system"]): r["score"] for r in rows}
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 3.6))
        width = 0.8 / len(systems)
        for k, system in enumerate(systems):
            xs = [i + k * width for i in range(len(groups))]
            ax.bar(xs, [by.get((t, lp, system), 0.0) for t, lp in groups], width, label=system)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{t}\n{lp}" for t, lp in groups])
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, out_dir / f"bars_{metric}.png"))
    chrf = [r for r in segment_scores if r["metric"] == "chrf"]
    if chrf:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for system in dict.fromkeys(r["system"] for r in chrf):
            ax.hist([r["score"] for r in chrf if r["system"] == system], bins=25, alpha=0.5, label=system)
        ax.set_xlabel("segment chrF")
        ax.set_ylabel("segments")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(save_figure_atomic(fig, out_dir / "distribution_chrf.png"))
    return paths


def scoring_section(counts: dict) -> str:
    """Per metric: requests, distinct requests, and how many the model scored vs the cache answered."""
    metrics = sorted({k.split("/")[0] for k in counts if k.endswith("/requests")})
    rows = [
        [
            m,
            str(counts[f"{m}/requests"]),
            str(counts[f"{m}/distinct"]),
            str(counts[f"{m}/scored"]),
            str(counts[f"{m}/from_cache"]),
        ]
        for m in metrics
    ]
    return markdown_table(["metric", "requests", "distinct", "scored", "from cache"], rows)


def preference_section(stats: dict) -> str:
    systems = sorted({s for e in stats["by_lp"].values() for s in e["chosen"] | e["rejected"]})
    rows = []
    for lp, e in stats["by_lp"].items():
        rows.append(
            [lp, str(e["pairs"])]
            + [
                f"{100 * e['chosen'].get(s, 0) / e['pairs']:.1f}% / "
                f"{100 * e['rejected'].get(s, 0) / e['pairs']:.1f}%"
                for s in systems
            ]
        )
    dropped = ", ".join(f"{k}: {v}" for k, v in sorted(stats["dropped"].items())) or "none"
    return (
        f"{stats['pairs']} pairs; dropped sources by reason: {dropped}.\n\n"
        "Share of chosen / rejected translations by system:\n\n"
        + markdown_table(["direction", "pairs", *systems], rows)
    )


def training_section(metrics_path: Path, summary: dict, curves: str | None) -> str:
    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    last = records[-1] if records else {}
    text = (
        f"{summary['steps']} optimizer steps on {summary['pairs_used']} pairs "
        f"({summary['trainable_parameters']:,} trainable parameters, {summary['device']}); "
        f"skipped by length: {summary['skipped']}."
    )
    if last:
        text += (
            f" Last logged step: loss {last['loss']:.4f}, NLL {last['nll_loss']:.4f}, "
            f"reward margin {last['rewards/margins']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}."
        )
    if curves:
        text += f"\n\n![training curves]({curves})"
    return text


def headline_section(results: list[dict]) -> str:
    """The first-screen table: per test set and direction, every metric as baseline -> cpo (gain), a dagger where
    the paired bootstrap p-value is below 0.05."""
    by = {(r["test_set"], r["lp"], r["system"], r["metric"]): r for r in results}
    metrics = ordered_metrics(results)
    rows = []
    for test_set, lp in sorted({(r["test_set"], r["lp"]) for r in results}):
        cells = [
            test_set,
            f"{lp} (n={by.get((test_set, lp, 'baseline', metrics[0]), {}).get('n_segments', '?')})",
        ]
        for metric in metrics:
            base, cpo = by.get((test_set, lp, "baseline", metric)), by.get((test_set, lp, "cpo", metric))
            if base is None or cpo is None:
                cells.append("–")
                continue
            mark = significance_mark(cpo, base)
            cells.append(
                f"{base['score']:.2f} → {cpo['score']:.2f} ({cpo['score'] - base['score']:+.2f}){mark}"
            )
        rows.append(cells)
    return markdown_table(["test set", "direction", *[METRIC_NAMES.get(m, m) for m in metrics]], rows)


def _gain(by: dict, test_set: str, lp: str, system: str, metric: str) -> tuple[float, bool] | None:
    """(score - baseline's, significant improvement) of one cell, None where either is missing."""
    r, base = by.get((test_set, lp, system, metric)), by.get((test_set, lp, "baseline", metric))
    if r is None or base is None:
        return None
    gain = r["score"] - base["score"]
    return gain, gain > 0 and significance_mark(r, base) == "†"


def split_metrics(results: list[dict], selection: list[str]) -> tuple[list[str], list[str]]:
    """The evaluated metrics that also chose the training pairs, and the held-out ones (never used to select).
    A selection metric with no corpus counterpart (consensus_chrf, published:...) is in neither."""
    evaluated = ordered_metrics(results)
    return [m for m in evaluated if m in selection], [m for m in evaluated if m not in selection]


def selection_only_gains(results: list[dict], selection: list[str]) -> list[tuple[str, str]]:
    """(test set, direction) where a selection metric improves significantly over the baseline and no held-out
    metric does: the gain may be the metric's, not the translation's (reward hacking)."""
    chosen, held_out = split_metrics(results, selection)
    if not chosen or not held_out:
        return []
    by = {(r["test_set"], r["lp"], r["system"], r["metric"]): r for r in results}
    flagged = []
    for test_set, lp in sorted({(r["test_set"], r["lp"]) for r in results}):
        sel = [_gain(by, test_set, lp, "cpo", m) for m in chosen]
        held = [_gain(by, test_set, lp, "cpo", m) for m in held_out]
        if any(g and g[1] for g in sel) and not any(g and g[1] for g in held):
            flagged.append((test_set, lp))
    return flagged


def metric_split_section(results: list[dict], selection: list[str]) -> str:
    """Baseline -> cpo gains, the metrics that selected the training pairs apart from the held-out ones, with a
    flag where only the former improve significantly."""
    chosen, held_out = split_metrics(results, selection)
    by = {(r["test_set"], r["lp"], r["system"], r["metric"]): r for r in results}
    flagged = set(selection_only_gains(results, selection))

    def cells(test_set, lp, metrics):
        out = []
        for m in metrics:
            g = _gain(by, test_set, lp, "cpo", m)
            out.append("–" if g is None else f"{METRIC_NAMES.get(m, m)} {g[0]:+.2f}{'†' if g[1] else ''}")
        return ", ".join(out) or "none evaluated"

    rows = [
        [
            test_set,
            lp,
            cells(test_set, lp, chosen),
            cells(test_set, lp, held_out),
            "⚠ selection metrics only" if (test_set, lp) in flagged else "",
        ]
        for test_set, lp in sorted({(r["test_set"], r["lp"]) for r in results})
    ]
    intro = (
        f"The training pairs were selected by {', '.join(f'`{m}`' for m in selection)}. Gains of `cpo` over "
        "`baseline`: † significant (paired bootstrap). ⚠ marks a direction where the selection metrics improve "
        "significantly and no held-out metric does: the gain may be the metric's, not the translation's."
    )
    if not held_out:
        intro += " Every evaluated metric also selected the pairs: no held-out metric (add one to evaluate.metrics)."
    table = markdown_table(["test set", "direction", "selection metrics", "held-out metrics", ""], rows)
    return f"{intro}\n\n{table}"


DECODINGS = (("beam", "cpo"), ("QE-reranked", "cpo+qe_rerank"), ("MBR", "cpo+mbr"))


def decoding_section(results: list[dict]) -> str:
    """The CPO model decoded with beam search, QE reranking and MBR (evaluate.decoding), per direction and metric;
    empty when only beam search ran."""
    present = [(name, system) for name, system in DECODINGS if any(r["system"] == system for r in results)]
    if len(present) < 2:
        return ""
    by = {(r["test_set"], r["lp"], r["system"], r["metric"]): r for r in results}
    rows = []
    for test_set, lp in sorted({(r["test_set"], r["lp"]) for r in results}):
        for metric in ordered_metrics(results):
            beam = by.get((test_set, lp, "cpo", metric))
            row = [test_set, lp, METRIC_NAMES.get(metric, metric)]
            for _, system in present:
                r = by.get((test_set, lp, system, metric))
                delta = f" ({r['score'] - beam['score']:+.2f})" if r and beam and system != "cpo" else ""
                row.append(f"{r['score']:.2f}{delta}" if r else "–")
            rows.append(row)
    header = ["test set", "direction", "metric", *[name for name, _ in present]]
    return (
        "## Decoding: beam vs QE-reranked vs MBR\n\nThe CPO model's beam output and its beam candidates chosen by "
        "quality-aware decoding (in parentheses: the difference to beam).\n\n" + markdown_table(header, rows)
    )
