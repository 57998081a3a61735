"""Stage 7, report: the run's evidence -> report.md and a self-contained report.html (plots inlined), the
results plots, and the trained model folder with its model card (report/model/README.md); report.md is also
written at the run folder's top."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from pathlib import Path

import yaml

from alma_r.config import RunConfig
from alma_r.data.io import read_rows, save_dir_atomic, save_figure_atomic, write_text_atomic
from alma_r.data.schemas import EVAL_RESULTS, SCORES
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key


def _table(header: list[str], rows: list[list[str]]) -> str:
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


def _metrics(results: list[dict]) -> list[str]:
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
        for metric in _metrics([r for r in results if r["test_set"] == test_set]):
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
                    mark = "†" if r["p_value"] is not None and r["p_value"] < SIGNIFICANT else ""
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
            out.append(f"### {test_set}: {METRIC_NAMES.get(metric, metric)}\n\n{_table(header, rows)}")
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
    for metric in _metrics(results):
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
    return _table(["metric", "requests", "distinct", "scored", "from cache"], rows)


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
        + _table(["direction", "pairs", *systems], rows)
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


def render_report(
    cfg: RunConfig, run_dir: Path, stages: list[StageResult], plots: list[Path], base: Path
) -> str:
    """report.md; image links are relative to `base`, the folder the file is written to."""
    by_name = {s.stage: s for s in stages}

    def link(path) -> str:
        return os.path.relpath(Path(path), base)

    results = read_rows(by_name["evaluate"].path("eval"), EVAL_RESULTS)
    stats = json.loads(by_name["select"].path("stats").read_text())
    train = by_name["train"]
    summary = json.loads(train.path("summary").read_text())
    counts = by_name["evaluate"].counts
    too_long = {k: v for k, v in counts.items() if k.endswith("prompt_too_long") and v}
    timing = _table(
        ["stage", "cached", "seconds"], [[s.stage, str(s.cached).lower(), f"{s.seconds:.1f}"] for s in stages]
    )
    margins = by_name["select"].outputs.get("margins_plot")
    parts = [
        f"# alma-r report: {cfg.run.name}",
        f"Base model `{cfg.model.base}`"
        + (f" + adapter `{cfg.model.adapter}`" if cfg.model.adapter else "")
        + f"; CPO loss `{cfg.train.loss_type}`, beta {cfg.train.beta}, NLL weight {cfg.train.cpo_alpha}, "
        f"LoRA r={cfg.train.lora.r} on {cfg.train.lora.target_modules}. Evaluation: beam {cfg.evaluate.num_beams}. "
        "`baseline` is the model before CPO, `cpo` the same model with the trained adapter.",
        "## Results",
        results_section(results),
        ("Prompts over the length limit (empty hypothesis, counted, never cut): " + json.dumps(too_long))
        if too_long
        else "No test prompt exceeded the length limit.",
        "\n\n".join(f"![{p.stem}]({link(p)})" for p in plots),
        "## Scoring",
        scoring_section(by_name["score"].counts),
        "## Preference data",
        preference_section(stats) + (f"\n\n![margin distribution]({link(margins)})" if margins else ""),
        "## Training",
        training_section(
            train.path("metrics"),
            summary,
            link(train.outputs["curves"]) if "curves" in train.outputs else None,
        ),
        "## Stages",
        timing,
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def markdown_to_html(markdown: str, base: Path, title: str) -> str:
    """A self-contained page from our report's markdown subset (headings, paragraphs, lists, pipe tables, images,
    `code`): images are inlined as data URIs, so the page loads nothing from anywhere."""

    def inline(text: str) -> str:
        text = html.escape(text)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)

    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = re.match(r"!\[(.*?)\]\((.*?)\)", line).groups()
            data = base64.b64encode((base / src).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{inline(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</tbody></table>"
            )
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "code{background:#f4f4f4;padding:1px 3px}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def model_card(cfg: RunConfig, stages: list[StageResult], results: list[dict]) -> str:
    """README.md for the trained adapter/model folder, in the Hugging Face layout (YAML metadata first)."""
    by_name = {s.stage: s for s in stages}
    lps = sorted({r["lp"] for r in results})
    langs = sorted({lang for lp in lps for lang in lp.split("-")})
    meta = {
        "library_name": "peft" if "adapter" in by_name["train"].outputs else "transformers",
        "base_model": cfg.model.base,
        "language": langs,
        "tags": ["translation", "cpo", "alma-r"],
        "pipeline_tag": "translation",
    }
    settings = json.loads(by_name["train"].path("summary").read_text())["settings"]
    sources = "\n".join(
        f"- `{s.name}` ({s.kind}, {s.pair}, {s.split}): "
        f"{s.path or s.test_set or ', '.join((s.files or {}).values())}"
        for s in cfg.ingest.sources
    )
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        f"# {cfg.run.name}: CPO-trained translation model\n\n"
        f"Trained with [alma-r](https://github.com/) (Contrastive Preference Optimization, Xu et al., ICML 2024) "
        f"from `{cfg.model.base}`"
        + (f" continuing the adapter `{cfg.model.adapter}`" if cfg.model.adapter else "")
        + f".\n\n## Evaluation\n\n{results_section(results)}\n\n## Training configuration\n\n```json\n"
        + json.dumps(settings, indent=2)
        + f"\n```\n\n## Data provenance\n\n{sources}\n"
    )


def publish_model(src: Path, card: str, out_dir: Path) -> Path:
    """The trained folder plus its model card, hard-linked (a 13B merged model is not copied)."""

    def write(tmp: Path):
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")

    return save_dir_atomic(out_dir, write)


def run_report(cfg: RunConfig, run_dir: Path, stages: list[StageResult], out_dir: Path) -> tuple[dict, dict]:
    by_name = {s.stage: s for s in stages}
    results = read_rows(by_name["evaluate"].path("eval"), EVAL_RESULTS)
    segment_scores = read_rows(by_name["evaluate"].path("segment_scores"), SCORES)
    plots = plot_results(results, segment_scores, out_dir)
    text = render_report(cfg, run_dir, stages, plots, base=out_dir)
    outputs = {
        "report": write_text_atomic(out_dir / "report.md", text),
        "html": write_text_atomic(
            out_dir / "report.html", markdown_to_html(text, out_dir, f"alma-r report: {cfg.run.name}")
        ),
    }
    trained = by_name["train"].outputs
    folder = trained.get("merged") or trained.get("adapter") or trained.get("model")
    outputs["model"] = publish_model(Path(folder), model_card(cfg, stages, results), out_dir / "model")
    for p in plots:
        outputs[f"plot/{p.stem}"] = p
    return outputs, {"bytes": len(text.encode()), "plots": len(plots)}


def report_key(cfg: RunConfig, run_dir: Path, stages: list[StageResult]) -> StageKey:
    sections = cfg.section_hash("model", "train", "evaluate", "ingest")
    key = stage_key("report", sections, stages, extra=[cfg.run.name, cfg.run.seed], module=__name__)
    return StageKey("report", Path(run_dir) / "report", key)


def report_stage(cfg: RunConfig, run_dir: Path, stages: list[StageResult]) -> StageResult:
    """Write report.md/.html and the model card, and publish the report to the Prefect UI."""
    result = run_stage(report_key(cfg, run_dir, stages), lambda out: run_report(cfg, run_dir, stages, out))
    plots = [Path(v) for k, v in result.outputs.items() if k.startswith("plot/")]
    text = render_report(cfg, run_dir, stages, plots, base=run_dir)
    write_text_atomic(run_dir / "report.md", text)
    try:
        from prefect.artifacts import create_markdown_artifact

        slug = cfg.run.name.lower().replace("_", "-")
        create_markdown_artifact(
            markdown=text, key=f"alma-r-report-{slug}", description="build-alma-r report"
        )
    except Exception as err:  # the report on disk is what matters; the UI copy is a convenience
        print(f"[report] could not publish the Prefect artifact: {err}")
    return result


report_task = stage_task(report_stage, report_key)
