"""Stage 7, report: the run's evidence in one readable page -> report.md (also at the run folder's top)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alma_r.config import RunConfig
from alma_r.data.io import read_rows, write_text_atomic
from alma_r.data.schemas import EVAL_RESULTS
from alma_r.tasks.stage import StageResult, run_stage, stage_key


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_section(results: list[dict]) -> str:
    """One table per test set: systems x directions, BLEU / chrF, with the gain over the baseline."""
    by = {(r["test_set"], r["lp"], r["system"], r["metric"]): r["score"] for r in results}
    out = []
    for test_set in sorted({r["test_set"] for r in results}):
        lps = sorted({r["lp"] for r in results if r["test_set"] == test_set})
        systems = list(dict.fromkeys(r["system"] for r in results if r["test_set"] == test_set))
        rows = []
        for system in systems:
            cells = [system]
            for lp in lps:
                cell = []
                for metric in ("bleu", "chrf"):
                    score = by.get((test_set, lp, system, metric))
                    base = by.get((test_set, lp, "baseline", metric))
                    if score is None:
                        cell.append("–")
                    elif system != "baseline" and base is not None:
                        cell.append(f"{score:.2f} ({score - base:+.2f})")
                    else:
                        cell.append(f"{score:.2f}")
                cells.append(" / ".join(cell))
            for side in ("-en", "en-"):  # the paper's two averages: xx->en, then en->xx
                chosen = [lp for lp in lps if (lp.endswith(side) if side == "-en" else lp.startswith(side))]
                vals = [by.get((test_set, lp, system, m)) for lp in chosen for m in ("bleu", "chrf")]
                if chosen and None not in vals:
                    bleu = sum(by[(test_set, lp, system, "bleu")] for lp in chosen) / len(chosen)
                    chrf = sum(by[(test_set, lp, system, "chrf")] for lp in chosen) / len(chosen)
                    cells.append(f"{bleu:.2f} / {chrf:.2f}")
                else:
                    cells.append("–")
            rows.append(cells)
        n = {
            lp: next(r["n_segments"] for r in results if r["test_set"] == test_set and r["lp"] == lp)
            for lp in lps
        }
        header = ["system", *[f"{lp} (n={n[lp]})" for lp in lps], "avg xx→en", "avg en→xx"]
        out.append(f"### {test_set}: BLEU / chrF (gain over baseline)\n\n{_table(header, rows)}")
    signatures = sorted({r["signature"] for r in results})
    out.append("Signatures (sacreBLEU):\n\n" + "\n".join(f"- `{s}`" for s in signatures))
    return "\n\n".join(out)


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


def render_report(cfg: RunConfig, run_dir: Path, stages: list[StageResult]) -> str:
    by_name = {s.stage: s for s in stages}
    results = read_rows(by_name["evaluate"].path("eval"), EVAL_RESULTS)
    stats = json.loads(by_name["select"].path("stats").read_text())
    train = by_name["train"]
    summary = json.loads(train.path("summary").read_text())
    curves = train.outputs.get("curves")
    curves_rel = str(Path(curves).relative_to(run_dir)) if curves else None
    counts = by_name["evaluate"].counts
    too_long = {k: v for k, v in counts.items() if k.endswith("prompt_too_long") and v}
    timing = _table(
        ["stage", "cached", "seconds"], [[s.stage, str(s.cached).lower(), f"{s.seconds:.1f}"] for s in stages]
    )
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
        "## Scoring",
        scoring_section(by_name["score"].counts),
        "## Preference data",
        preference_section(stats)
        + (
            f"\n\n![margin distribution]({Path(by_name['select'].outputs['margins_plot']).relative_to(run_dir)})"
            if "margins_plot" in by_name["select"].outputs
            else ""
        ),
        "## Training",
        training_section(train.path("metrics"), summary, curves_rel),
        "## Stages",
        timing,
    ]
    return "\n\n".join(parts) + "\n"


def run_report(cfg: RunConfig, run_dir: Path, stages: list[StageResult], out_dir: Path) -> tuple[dict, dict]:
    text = render_report(cfg, run_dir, stages)
    path = write_text_atomic(out_dir / "report.md", text)
    return {"report": path}, {"bytes": len(text.encode())}


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: RunConfig, run_dir: Path, stages: list[StageResult]) -> StageResult:
    """Write report.md and publish it to the Prefect UI."""
    key = stage_key("report", cfg.section_hash("run", "model", "train", "evaluate"), stages)
    result = run_stage("report", run_dir / "report", key, lambda out: run_report(cfg, run_dir, stages, out))
    text = result.path("report").read_text()
    write_text_atomic(run_dir / "report.md", text)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            markdown=text,
            key=f"alma-r-report-{cfg.run.name}".lower().replace("_", "-"),
            description="build-alma-r report",
        )
    except Exception as err:  # the report on disk is what matters; the UI copy is a convenience
        print(f"[report] could not publish the Prefect artifact: {err}")
    return result
