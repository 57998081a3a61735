"""The `sequence-cpo` flow: sequence-level CPO with synthetic negatives for instruction following ("Sequence-level
Large Language Model Training with Contrastive Preference Optimization", anonymous ACL submission, section 5,
Dolly), wired like the diagram in docs/architecture.md:

    ingest -> prepare_model -> mle -> generate (AN samples, when on) -> train (sequence-level CPO)
           -> wise_ft (alpha grid) ; scorer (P-hat) -> evaluate (eq. 9, eq. 10) -> judge (when configured)
           -> report

Stages (tasks/sequence/, one module each) are cached Prefect tasks over files, run and recorded by flows/steps.py;
the GPU ones (mle, generate, train, scorer, evaluate) run in child processes. A rerun with the same config finds
every stage cached.
"""

from __future__ import annotations

from prefect import flow

from alma_r.config.sequence import load_sequence_config
from alma_r.flows.steps import StageSteps, forced_stages, run_dir_for
from alma_r.tasks.sequence.evaluate import evaluate_task
from alma_r.tasks.sequence.generate import generate_task
from alma_r.tasks.sequence.ingest import ingest_task
from alma_r.tasks.sequence.judge import judge_task
from alma_r.tasks.sequence.mle import mle_task
from alma_r.tasks.sequence.prepare_model import prepare_model_task
from alma_r.tasks.sequence.report import report_task
from alma_r.tasks.sequence.scorer import scorer_task
from alma_r.tasks.sequence.train import train_task
from alma_r.tasks.sequence.wise_ft import wise_ft_task

STAGES = (
    "ingest",
    "prepare_model",
    "mle",
    "generate",
    "train",
    "wise_ft",
    "scorer",
    "evaluate",
    "judge",
    "report",
)


@flow(name="sequence-cpo", log_prints=True)
def sequence_cpo(
    config_path: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> str:
    """Train MLE and sequence-level CPO models on Dolly-style data, ensemble them, evaluate; returns the run
    folder. config_path: YAML (alma_r/config/sequence.py; default: its defaults); overrides: `a.b=value`;
    force: stages to recompute (or ["all"])."""
    overrides, force = list(overrides or []), forced_stages(force, STAGES)
    cfg = load_sequence_config(config_path, overrides)
    step = StageSteps.start(
        cfg, run_dir_for(cfg), config_path, overrides, force, flow="sequence-cpo", flow_module=__name__
    )

    instructions = step("ingest", ingest_task)
    base = step("prepare_model", prepare_model_task, instructions)
    mle = step("mle", mle_task, instructions, base)
    samples = step("generate", generate_task, instructions, mle)
    cpo = step("train", train_task, instructions, mle, samples)
    grid = step("wise_ft", wise_ft_task, mle, cpo)
    scorer = step("scorer", scorer_task, instructions, base)
    evaluated = step("evaluate", evaluate_task, instructions, mle, grid, scorer)
    judged = step("judge", judge_task, instructions, evaluated)
    step("report", report_task, instructions, mle, cpo, evaluated, judged)
    return step.finish()
