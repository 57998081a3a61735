"""The `build-alma-r` flow: ingest -> [prepare model -> SFT] -> generate -> score -> select -> train -> evaluate
-> report. It reads like the diagram in docs/architecture.md: stages exchange only files (StageResult paths)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from alma_r.config import RunConfig, load_config
from alma_r.flows.run_record import RunRecord
from alma_r.tasks.evaluate import evaluate_task
from alma_r.tasks.generate import generate_task
from alma_r.tasks.ingest import ingest_task
from alma_r.tasks.prepare_model import prepare_model_task
from alma_r.tasks.report import report_task
from alma_r.tasks.score import score_task
from alma_r.tasks.select import select_task
from alma_r.tasks.sft import sft_task
from alma_r.tasks.stage import StageResult
from alma_r.tasks.train import train_task


def run_dir_for(cfg: RunConfig) -> Path:
    return (Path(cfg.run.root) / cfg.run.name).resolve()


@flow(name="build-alma-r", log_prints=True)
def build_alma_r(config_path: str | None = None, overrides: list[str] | None = None) -> str:
    """Build a CPO-trained translation model and its report; returns the run folder."""
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    run_dir = run_dir_for(cfg)
    record = RunRecord(run_dir, config_path, overrides, cfg.model_dump(mode="json"))
    done: list[StageResult] = []

    def step(name, task_fn, *args) -> StageResult:
        try:
            result = task_fn(cfg, run_dir, *args)
        except BaseException as err:
            record.stage_failed(name, err)
            raise
        record.stage_done(result)
        done.append(result)
        print(f"[{name}] {'cached' if result.cached else f'done in {result.seconds:.1f}s'}: {result.counts}")
        return result

    segments = step("ingest", ingest_task)
    base = step("prepare_model", prepare_model_task, segments)
    policy = step("sft", sft_task, segments, base)
    candidates = step("generate", generate_task, segments, policy)
    scores = step("score", score_task, segments, candidates)
    pairs = step("select", select_task, segments, candidates, scores)
    trained = step("train", train_task, pairs, policy)
    step("evaluate", evaluate_task, segments, policy, trained)
    step("report", report_task, list(done))
    record.finish("completed")
    print(f"report: {run_dir / 'report.md'}")
    return str(run_dir)
