"""The `sequence-cpo` flow: sequence-level CPO with synthetic negatives for instruction following
(shared/seeds/003, section 5, Dolly), wired like the diagram in docs/architecture.md:

    ingest -> prepare_model -> mle -> generate (AN samples, when on) -> train (sequence-level CPO)
           -> wise_ft (alpha grid) ; scorer (P-hat) -> evaluate (eq. 9, eq. 10) -> judge (when configured)
           -> report

Stages are cached Prefect tasks (tasks/runtime/prefect_stage.py) over files; the GPU ones (mle, generate, train,
scorer, evaluate) run in child processes. A rerun with the same config finds every stage cached.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from alma_r.config.sequence import SequenceRunConfig, load_sequence_config
from alma_r.flows.build_alma_r import run_cached
from alma_r.flows.run_record import RunRecord
from alma_r.tasks.runtime.prefect_stage import clear_scratch
from alma_r.tasks.runtime.stage import StageResult, code_version
from alma_r.tasks.sequence.evaluate_tmp import evaluate_task, judge_task, report_task
from alma_r.tasks.sequence.stages_tmp import (
    generate_task,
    ingest_task,
    mle_task,
    prepare_model_task,
    scorer_task,
    train_task,
    wise_ft_task,
)

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


class Stages:
    """Runs one stage after another, recording each in run.json; `force` names stages to recompute."""

    def __init__(self, cfg: SequenceRunConfig, run_dir: Path, record: RunRecord, force: set[str]):
        self.cfg, self.run_dir, self.record, self.force = cfg, run_dir, record, force

    def __call__(self, name: str, stage_task, *upstream: StageResult) -> StageResult:
        forced = bool(self.force & {name, "all"})
        try:
            result = run_cached(stage_task, self.cfg, self.run_dir, *upstream, force=forced)
        except BaseException as err:
            self.record.stage_failed(name, err)
            raise
        result.stage = name
        self.record.stage_done(result)
        state = "cached" if result.cached else f"done in {result.seconds:.1f}s"
        print(f"[{name}] {state}: {result.counts}")
        return result


@flow(name="sequence-cpo", log_prints=True)
def sequence_cpo(
    config_path: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> str:
    """Train MLE and sequence-level CPO models on Dolly-style data, ensemble them, evaluate; returns the run
    folder. config_path: YAML (alma_r/config/sequence.py; default: its defaults); overrides: `a.b=value`;
    force: stages to recompute (or ["all"])."""
    overrides, force = list(overrides or []), set(force or [])
    unknown = force - set(STAGES) - {"all"}
    if unknown:
        raise ValueError(f"force: unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    cfg = load_sequence_config(config_path, overrides)
    run_dir = (Path(cfg.run.root) / cfg.run.name).resolve()
    clear_scratch(run_dir)
    record = RunRecord(run_dir, config_path, overrides, cfg.model_dump(mode="json"))
    record.data["flow"] = "sequence-cpo"
    record.data["code_version"] = code_version(__name__)
    step = Stages(cfg, run_dir, record, force)

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
    record.finish("completed")
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)
