"""The report stage of the sequence-cpo flow: report.md, one row per model (the MLE model, each WiSE-FT alpha)
with eq. 10, eq. 9 and the judge's win rate, and the run's settings in a few lines."""

from __future__ import annotations

import json
from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.data.files import write_text_atomic
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def results_table(metrics: dict, win_rates: dict) -> str:
    """One row per model: the MLE model, then each WiSE-FT alpha."""
    lines = [
        "| model | alpha | NLL eq. 10, greedy | NLL eq. 10, samples | reverse-KL eq. 9 | win rate [CI] |",
        "|---|---|---|---|---|---|",
    ]
    for m in metrics["models"]:
        judged = win_rates.get(m["system"])
        rate = "n/a"
        if judged and judged["win_rate"] is not None:
            rate = f"{judged['win_rate']:.3f} [{judged['ci_low']:.3f}, {judged['ci_high']:.3f}]"
        alpha = "-" if m["alpha"] is None else f"{m['alpha']:.2f}"
        lines.append(
            f"| {m['system']} | {alpha} | {_number(m['nll_greedy'])} | {_number(m['nll_samples'])} "
            f"| {_number(m['reverse_kl'])} | {rate} |"
        )
    return "\n".join(lines)


def render_report(
    cfg: SequenceRunConfig,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    metrics: dict,
    win_rates: dict,
) -> str:
    t, n = cfg.train, cfg.negatives
    kinds = ", ".join(
        f"{count} {name}"
        for name, count in (
            ("BN", n.batch),
            ("MN", n.meanfield),
            ("TN", n.truncation),
            ("AN", n.autoregressive),
        )
        if count
    )
    judge_line = (
        "no judge endpoint configured (win rate n/a)"
        if cfg.judge is None
        else f"{cfg.judge.endpoint.model} at {cfg.judge.endpoint.base_url}, template {cfg.judge.template}, both "
        f"answer orders; Wilson {cfg.judge.confidence:.0%} interval over items decided in both orders"
    )
    return f"""# sequence-cpo run `{cfg.run.name}`

Sequence-level CPO with synthetic negatives ("Sequence-level Large Language Model Training with Contrastive
Preference Optimization", anonymous ACL submission), instruction following.

- Data: `{cfg.data.path}`: {instructions.counts["train"]} training and {instructions.counts["test"]} test
  instructions; {metrics["items"]} evaluated ({metrics["skipped_prompt_too_long"]} test prompts over the limit).
- MLE: {mle.counts["steps"]} steps x {cfg.mle.batch_size}, lr {cfg.mle.learning_rate}.
- CPO: {cpo.counts["steps"]} steps x {t.batch_size}, loss {t.loss} (eq. {7 if t.loss == "best_of_k" else 8}),
  beta {t.beta}, lr {t.learning_rate}; negatives per example: {kinds}.
- WiSE-FT: alpha x MLE + (1 - alpha) x CPO (alpha 1 = the MLE model, 0 = the CPO model).
- Scoring model P-hat: `{metrics["scorer"]}` (scored as {metrics["scored_as"]}). NLL eq. 10: mean over
  instructions of -log P-hat(y|x) / |y| (tokens, EOS included) of the greedy output and of
  {metrics["samples_per_prompt"]} samples (temperature 1, no top-k); reverse-KL eq. 9: Monte Carlo mean over those
  samples of log Q(y|x) - log P-hat(y|x). Lower is better for both; at most {metrics["max_new_tokens"]} new tokens.
- Judge: {judge_line}.

{results_table(metrics, win_rates)}
"""


def run_report(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    evaluated: StageResult,
    judge: StageResult,
    out_dir: Path,
) -> tuple[dict, dict]:
    metrics = json.loads(evaluated.path("metrics").read_text(encoding="utf-8"))
    win_rates = json.loads(judge.path("win_rates").read_text()) if "win_rates" in judge.outputs else {}
    text = render_report(cfg, instructions, mle, cpo, metrics, win_rates)
    report = write_text_atomic(out_dir / "report.md", text)
    write_text_atomic(Path(run_dir) / "report.md", text)  # beside run.json, as build-alma-r's
    return {"report": report}, {"rows": len(metrics["models"])}


def report_key(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    evaluated: StageResult,
    judge: StageResult,
) -> StageKey:
    key = stage_key(
        "report",
        cfg.section_hash("run", "data", "mle", "negatives", "train", "judge"),
        [instructions, mle, cpo, evaluated, judge],
        module=__name__,
    )
    return StageKey("report", Path(run_dir) / "report", key)


def report_stage(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    evaluated: StageResult,
    judge: StageResult,
) -> StageResult:
    """report.md: one row per model (MLE, each WiSE-FT alpha) with eq. 10, eq. 9 and the win rate."""
    return run_stage(
        report_key(cfg, run_dir, instructions, mle, cpo, evaluated, judge),
        lambda out: run_report(cfg, run_dir, instructions, mle, cpo, evaluated, judge, out),
    )


report_task = stage_task(report_stage, report_key)
