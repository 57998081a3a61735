"""The `build-alma-r` flow: ingest -> [prepare model -> SFT] -> generate -> score -> select -> train -> evaluate
-> report. It reads like the diagram in docs/architecture.md: stages exchange only files (StageResult paths).

Each stage is a cached Prefect task (tasks/runtime/prefect_stage.py), run and recorded by flows/steps.py: a new flow
run, or a rerun after a crash, finds the finished stages Cached and recomputes only what is missing; `force`
recomputes the named stages.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped

from alma_r.config import RunConfig, load_config
from alma_r.flows.steps import StageSteps, forced_stages, run_dir_for
from alma_r.tasks.evaluate import evaluate_task
from alma_r.tasks.generate import generate_task
from alma_r.tasks.ingest import ingest_task
from alma_r.tasks.prepare_model import prepare_model_task
from alma_r.tasks.report import report_task
from alma_r.tasks.runtime.stage import StageResult, is_complete
from alma_r.tasks.score import score_merge_task, score_shard_task, score_task
from alma_r.tasks.select import select_task
from alma_r.tasks.sft import sft_task
from alma_r.tasks.train import train_task

STAGES = ("ingest", "prepare_model", "sft", "generate", "score", "select", "train", "evaluate", "report")


def task_runner_for(cfg: RunConfig):
    if cfg.run.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.run.dask_address:
            return DaskTaskRunner(address=cfg.run.dask_address)
        return DaskTaskRunner(
            cluster_class=cfg.run.dask_cluster_class,
            cluster_kwargs={"n_workers": cfg.run.dask_workers, "threads_per_worker": 1},
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=cfg.run.shards)


@flow(name="score-shards", log_prints=True)
def score_shards(cfg: RunConfig, run_dir: Path, segments: StageResult, candidates: StageResult) -> list:
    """Fan the score stage out over `run.shards` shards of segments on the task runner (Dask: one per GPU)."""
    n = cfg.run.shards
    complete = all(
        is_complete(score_shard_task.stage_key(cfg, run_dir, segments, candidates, i, n)) for i in range(n)
    )
    futures = score_shard_task.with_options(refresh_cache=not complete).map(
        unmapped(cfg), unmapped(run_dir), unmapped(segments), unmapped(candidates), range(n), unmapped(n)
    )
    return [f.result() for f in futures]


@flow(name="build-alma-r", log_prints=True)
def build_alma_r(
    config_path: str | None = None, overrides: list[str] | None = None, force: list[str] | None = None
) -> str:
    """Build a CPO-trained translation model and its report; returns the run folder.

    config_path: YAML run config (default: the built-in tiny CPU configuration);
    overrides: `section.key=value` settings applied on top; force: stages to recompute (or ["all"]).
    """
    overrides, force = list(overrides or []), forced_stages(force, STAGES)
    cfg = load_config(config_path, overrides)
    run_dir = run_dir_for(cfg)
    step = StageSteps.start(cfg, run_dir, config_path, overrides, force)

    segments = step("ingest", ingest_task)
    base = step("prepare_model", prepare_model_task, segments)
    policy = step("sft", sft_task, segments, base)
    candidates = step("generate", generate_task, segments, policy)
    if cfg.run.shards > 1:
        shards = score_shards.with_options(task_runner=task_runner_for(cfg))(
            cfg, run_dir, segments, candidates
        )
        scores = step("score", score_merge_task, segments, candidates, shards)
    else:
        scores = step("score", score_task, segments, candidates)
    pairs = step("select", select_task, segments, candidates, scores)
    trained = step("train", train_task, pairs, policy)
    step("evaluate", evaluate_task, segments, policy, trained)
    step("report", report_task, list(step.done))
    return step.finish()
