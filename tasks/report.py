"""Stage 7, report: the run's evidence -> report.md and a self-contained report.html (plots inlined), the
results plots, and the trained model folder with its model card (report/model/README.md); report.md is also
written at the run folder's top.

report.md opens with one screen that answers a new user's questions (what was run, the headline baseline-vs-CPO
table, stage times and what was cached, what to worry about, where to look next); the detailed sections follow.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import yaml

from alma_r.config import RunConfig
from alma_r.data.files import save_dir_atomic, write_text_atomic
from alma_r.data.io import read_rows
from alma_r.data.schemas import EVAL_RESULTS, HYPOTHESES, SCORES
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.markdown_html import markdown_to_html
from alma_r.tasks.shared.report_sections import (
    SIGNIFICANT,
    decoding_section,
    headline_section,
    markdown_table,
    metric_split_section,
    plot_results,
    preference_section,
    results_section,
    scoring_section,
    selection_only_gains,
    training_section,
)

REPORT_DIR = "report"  # the stage's folder in the run folder (report_key)
SMOKE_TEST = (
    "**Smoke-test model.** `model.base: tiny` is a tiny LLaMA built locally to run every stage on a CPU in "
    "minutes: its BLEU is near zero by design, so these numbers show that the pipeline works, not what CPO does "
    "for translation (`configs/alma-13b-r.yaml` is the paper's recipe)."
)


def recorded_inputs(run_dir: Path) -> tuple[str | None, list[str]]:
    """The config file and overrides the flow run recorded in run.json (none when the stage runs on its own)."""
    try:
        run = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None, []
    return run.get("config_path"), list(run.get("overrides") or [])


def data_line(by_name: dict[str, StageResult]) -> str:
    """Segments per split and direction, generation sources, preference pairs and training steps."""
    ingest = by_name["ingest"].counts
    splits: dict[str, list[str]] = {}
    for name, n in ingest.items():
        if "/" in name:  # "train/de-en": segments of one split and direction
            splits.setdefault(name.split("/")[0], []).append(f"{name.split('/', 1)[1]} {n:,}")
    shown = "; ".join(f"{split}: {', '.join(lps)}" for split, lps in splits.items())
    text = f"{ingest.get('segments', 0):,} segments ({shown})"
    generate = by_name["generate"].counts
    translated = generate.get("sources", 0) - generate.get("skipped_prompt_too_long", 0)  # the rest: too long
    text += f"; {translated:,} sources translated for candidates"
    text += f"; {by_name['select'].counts.get('pairs', 0):,} preference pairs"
    train = by_name["train"].counts
    text += f"; CPO: {train.get('steps', 0)} steps on {train.get('pairs_used', 0):,} pairs"
    if "sft" in by_name:
        sft = by_name["sft"].counts
        text += f" after SFT: {sft.get('steps', 0)} steps on {sft.get('pairs_used', 0):,} pairs"
    return text + "."


def stages_line(stages: list[StageResult]) -> str:
    """Stage times and which stages were reused; a cached stage's seconds are those of the run that computed it."""
    parts = [f"{s.stage} {s.seconds:.1f}" + (" (cached)" if s.cached else "") for s in stages]
    computed = [s for s in stages if not s.cached]
    return (
        "Stages (seconds): " + " · ".join(parts) + f". {len(stages) - len(computed)} of {len(stages)} reused "
        f"from an earlier run (cached), {len(computed)} computed by this one in "
        f"{sum(s.seconds for s in computed):.1f} s."
    )


def run_warnings(
    cfg: RunConfig, by_name: dict[str, StageResult], stats: dict, hypotheses: list[dict]
) -> list[str]:
    """What a user should look at: inputs skipped as too long, sources that gave no pair, empty hypotheses."""
    out = []
    for stage, limit in (("sft", "sft.max_length"), ("train", "train.max_length")):
        counts = by_name[stage].counts if stage in by_name else {}
        if skipped := counts.get("skipped_prompt_too_long", 0) + counts.get("skipped_too_long", 0):
            out.append(f"{stage}: {skipped:,} training pairs skipped as too long (prompt or `{limit}`).")
    generate = by_name["generate"].counts
    # One list for every system (tasks/generate.py skip_list): one line, per direction, not one per system.
    too_long = {
        name.split("/", 1)[1]: n
        for name, n in generate.items()
        if name.startswith("skipped_prompt_too_long/") and n
    }
    if too_long:
        out.append(
            f"generate: {sum(too_long.values()):,} of {generate.get('sources', 0):,} sources skipped for every "
            f"system, their prompt exceeds `generate.max_prompt_tokens` ({cfg.generate.max_prompt_tokens}): "
            + ", ".join(f"{lp} {n:,}" for lp, n in too_long.items())
            + "."
        )
    if stats["dropped"]:
        dropped = ", ".join(f"{k}: {v:,}" for k, v in sorted(stats["dropped"].items()))
        out.append(f"select: {sum(stats['dropped'].values()):,} sources gave no preference pair ({dropped}).")
    evaluate = by_name["evaluate"].counts
    too_long = {k.split("/")[0]: v for k, v in evaluate.items() if k.endswith("/prompt_too_long") and v}
    for system, n in too_long.items():
        out.append(
            f"evaluate: {n:,} test prompts of `{system}` exceed `evaluate.max_prompt_tokens` "
            f"({cfg.evaluate.max_prompt_tokens}): empty hypotheses, counted, never cut."
        )
    empty = Counter(h["system"] for h in hypotheses if not h["hypothesis"].strip())
    total = Counter(h["system"] for h in hypotheses)
    for system, n in empty.items():
        if n > too_long.get(system, 0):
            out.append(
                f"evaluate: `{system}` produced {n - too_long.get(system, 0):,} empty hypotheses of "
                f"{total[system]:,} (scored as such)."
            )
    train = by_name["train"]
    if train.counts.get("resumed_from"):
        written_by = train.counts.get("resumed_checkpoint_written_by")
        under = f" (checkpoint written by {written_by})" if written_by else ""
        out.append(f"train: resumed from the checkpoint of step {train.counts['resumed_from']}{under}.")
    for result in by_name.values():
        for aside in result.superseded:
            out.append(
                f"{result.stage}: the outputs of an earlier key were set aside, not deleted ({aside['why']}): "
                f"`{aside['path']}` (`alma-r prune-cache` removes them)."
            )
    return out


def selection_metrics(cfg: RunConfig) -> list[str]:
    """The metrics whose mean chose the training pairs (select.metrics, by default every score metric)."""
    return cfg.select.metrics or cfg.score.metrics


def model_names(cfg: RunConfig, by_name: dict[str, StageResult]) -> tuple[str, str | None]:
    """Base model and adapter as the run used them: a Hub id with its revision and the commit prepare_model
    resolved it to (a branch moves: the commit says which weights these results are of), a folder as named."""
    resolved = by_name["prepare_model"].counts.get("resolved", []) if "prepare_model" in by_name else []

    def shown(name: str | None, revision: str | None) -> str | None:
        if name is None:
            return None
        for snapshot in resolved:
            if snapshot["repo_id"] == name and snapshot["revision"] == revision:
                return f"{name}@{revision or 'main'} (commit {snapshot['commit'][:12]})"
        return f"{name}@{revision}" if revision else name

    return shown(cfg.model.base, cfg.model.revision), shown(cfg.model.adapter, cfg.model.adapter_revision)


def trained_weights(cfg: RunConfig) -> str:
    """What CPO trained: a continued adapter keeps its own LoRA configuration, so train.lora is not it."""
    if cfg.model.adapter:
        return "the adapter's own LoRA"
    if cfg.train.finetune == "full":
        return "every weight"
    return f"LoRA r={cfg.train.lora.r} on {cfg.train.lora.target_modules}"


def first_screen(
    cfg: RunConfig, run_dir: Path, stages: list[StageResult], plots: list[Path], base: Path
) -> str:
    """The report's top: what was run, the headline table, stage times, warnings, links (relative to `base`)."""
    by_name = {s.stage: s for s in stages}
    results = read_rows(by_name["evaluate"].path("eval"), EVAL_RESULTS)
    stats = json.loads(by_name["select"].path("stats").read_text())
    config_path, overrides = recorded_inputs(run_dir)
    hypotheses = read_rows(by_name["evaluate"].path("hypotheses"), HYPOTHESES)
    trained = by_name["train"].outputs
    folder = trained.get("merged") or trained.get("adapter") or trained.get("model")
    shown = ", ".join(f"`{o}`" for o in overrides) or "none"
    base_name, adapter_name = model_names(cfg, by_name)
    what = [
        f"- Config: `{config_path or '(not recorded)'}`; overrides: {shown}; seed {cfg.run.seed}.",
        f"- Model: base `{base_name}`"
        + (f" + adapter `{adapter_name}`" if adapter_name else "")
        + f"; CPO loss `{cfg.train.loss_type}`, beta {cfg.train.beta}, NLL weight {cfg.train.cpo_alpha}, "
        f"{trained_weights(cfg)}; trained: "
        f"`{os.path.relpath(folder, base) if folder and Path(folder).exists() else folder}`.",
        f"- Data: {data_line(by_name)}",
        f"- {stages_line(stages)}",
    ]
    warnings = run_warnings(cfg, by_name, stats, hypotheses)
    warnings += [
        f"report: {test_set} {lp}: the metrics that selected the training pairs improve significantly, the "
        "held-out metrics do not (possible metric over-fitting: Selection metrics vs held-out metrics)."
        for test_set, lp in selection_only_gains(results, selection_metrics(cfg))
    ]
    parts = [
        f"# alma-r report: {cfg.run.name}",
        SMOKE_TEST if cfg.model.base == "tiny" else "",
        "\n".join(what),
        "## Headline: baseline → CPO",
        headline_section(results),
        f"`baseline` is the model before CPO, `cpo` the same model with the trained adapter (evaluation: beam "
        f"{cfg.evaluate.num_beams}); † the difference is significant (paired bootstrap, p < {SIGNIFICANT}). "
        "Every system, the averages and the signatures: Results below.",
        "## Warnings",
        "\n".join(f"- {w}" for w in warnings) if warnings else "None: nothing skipped, dropped or empty.",
        "## Where to look next",
        "\n".join(
            f"- [{name}]({os.path.relpath(path, base)})"
            for name, path in report_links(run_dir, stages, plots)
        ),
    ]
    return "\n\n".join(p for p in parts if p)


def report_links(run_dir: Path, stages: list[StageResult], plots: list[Path]) -> list[tuple[str, Path]]:
    """Where to look next: the HTML page, the plots, the training curves, the model card and run.json."""
    by_name = {s.stage: s for s in stages}
    report = Path(run_dir) / REPORT_DIR
    links = [("report.html: this report, plots inlined", report / "report.html")]
    links += [(f"plot: {p.stem}", Path(p)) for p in plots]
    sft = by_name.get("sft")
    if sft and "metrics" in sft.outputs and (sft.path("metrics").parent / "curves.png").is_file():
        links.append(("SFT curves", sft.path("metrics").parent / "curves.png"))
    if "curves" in by_name["train"].outputs:
        links.append(("CPO training curves", by_name["train"].path("curves")))
    if by_name["select"].outputs.get("margins_plot"):
        links.append(("preference margins", by_name["select"].path("margins_plot")))
    links.append(("model card", report / "model" / "README.md"))
    links.append(("run.json: every stage", Path(run_dir) / "run.json"))
    return links


def render_report(
    cfg: RunConfig, run_dir: Path, stages: list[StageResult], plots: list[Path], base: Path
) -> str:
    """report.md: the first screen, then the detailed sections; links are relative to `base`, the folder the
    file is written to."""
    by_name = {s.stage: s for s in stages}

    def link(path) -> str:
        return os.path.relpath(Path(path), base)

    results = read_rows(by_name["evaluate"].path("eval"), EVAL_RESULTS)
    stats = json.loads(by_name["select"].path("stats").read_text())
    train = by_name["train"]
    summary = json.loads(train.path("summary").read_text())
    counts = by_name["evaluate"].counts
    too_long = {k: v for k, v in counts.items() if k.endswith("prompt_too_long") and v}
    timing = markdown_table(
        ["stage", "cached", "seconds"], [[s.stage, str(s.cached).lower(), f"{s.seconds:.1f}"] for s in stages]
    )
    margins = by_name["select"].outputs.get("margins_plot")
    parts = [
        first_screen(cfg, run_dir, stages, plots, base),
        "## Results",
        results_section(results),
        "## Selection metrics vs held-out metrics",
        metric_split_section(results, selection_metrics(cfg)),
        decoding_section(results),
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


def model_card(cfg: RunConfig, stages: list[StageResult], results: list[dict]) -> str:
    """README.md for the trained adapter/model folder, in the Hugging Face layout (YAML metadata first)."""
    by_name = {s.stage: s for s in stages}
    base_name, adapter_name = model_names(cfg, by_name)
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
        f"from `{base_name}`"
        + (f" continuing the adapter `{adapter_name}`" if adapter_name else "")
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
    # select and score: which metrics selected the pairs decides the report's selection / held-out split.
    sections = cfg.section_hash("model", "train", "evaluate", "ingest", "select", "score")
    key = stage_key("report", sections, stages, extra=[cfg.run.name, cfg.run.seed], module=__name__)
    return StageKey("report", Path(run_dir) / REPORT_DIR, key)


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
