"""How a flow runs its stages, the same for every flow: refuse an unknown `force` stage before anything is written,
run each stage as a cached Prefect task that is trusted only while its folder holds its outputs, record each in
run.json (a failure with its kind, tasks/runtime/failures.py), and print `[name] cached|done in Xs: counts`.

    force = forced_stages(force, STAGES)        # before the config is even loaded
    cfg = load_config(config_path, overrides)
    step = StageSteps.start(cfg, run_dir, config_path, overrides, force)
    segments = step("ingest", ingest_task)
    base = step("prepare_model", prepare_model_task, segments)
    ...
    return step.finish()
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from alma_r.config import ConfigError
from alma_r.flows.run_record import RunRecord
from alma_r.tasks.runtime.failures import mark_stage
from alma_r.tasks.runtime.prefect_stage import clear_scratch
from alma_r.tasks.runtime.stage import StageResult, force_recompute, is_complete

ALL = "all"  # `force` value that recomputes every stage


def run_dir_for(cfg) -> Path:
    """<run.root>/<run.name>, absolute: where a flow run writes its stage folders and run.json."""
    return (Path(cfg.run.root) / cfg.run.name).resolve()


def forced_stages(force: Iterable[str] | None, stages: tuple[str, ...]) -> set[str]:
    """`force` as a set; a name that is not one of the flow's stages (or "all") is refused (a config error)."""
    force = set(force or [])
    unknown = force - set(stages) - {ALL}
    if unknown:
        raise ConfigError(f"force: unknown stage(s) {sorted(unknown)}; stages are {', '.join(stages)}")
    return force


def run_cached(stage_task, cfg, run_dir: Path, *upstream, force: bool = False) -> StageResult:
    """Run a stage task, trusting Prefect's cache record only while the stage folder holds its outputs."""
    where = stage_task.stage_key(cfg, run_dir, *upstream)
    if force:
        force_recompute(where.out_dir)
    # A deleted, damaged or forced output refreshes the record instead of handing on a dead path.
    fresh = stage_task.with_options(refresh_cache=not is_complete(where))
    state = fresh(cfg, run_dir, *upstream, return_state=True)
    result = state.result()
    if state.is_completed() and state.name == "Cached":
        result.cached = True
    return result


class StageSteps:
    """Runs one flow run's stages one after another: `step(name, stage_task, *upstream)` runs (or reuses) the
    stage, records it in run.json (a failure too, before it propagates) and prints what it did. `done` lists
    the finished stages in order."""

    def __init__(self, cfg, run_dir: Path, record: RunRecord, force: set[str]):
        self.cfg, self.run_dir, self.record, self.force = cfg, Path(run_dir), record, force
        self.done: list[StageResult] = []

    @classmethod
    def start(
        cls,
        cfg,
        run_dir: Path,
        config_path: str | None,
        overrides: list[str],
        force: set[str],
        flow: str | None = None,
        flow_module: str = "alma_r.flows.build_alma_r",
    ) -> StageSteps:
        """A new flow run in `run_dir`: what a killed run left in its scratch folder is removed and run.json
        starts over (`flow`, `flow_module`: as RunRecord takes them)."""
        clear_scratch(run_dir)
        record = RunRecord(run_dir, config_path, overrides, cfg.model_dump(mode="json"), flow, flow_module)
        return cls(cfg, run_dir, record, force)

    def __call__(self, name: str, stage_task, *upstream) -> StageResult:
        forced = bool(self.force & {name, ALL})
        try:
            result = run_cached(stage_task, self.cfg, self.run_dir, *upstream, force=forced)
        except BaseException as err:
            mark_stage(err, name)  # the one-line message names the stage
            self.record.stage_failed(name, err)
            raise
        result.stage = name
        self.record.stage_done(result)
        self.done.append(result)
        state = "cached" if result.cached else f"done in {result.seconds:.1f}s"
        print(f"[{name}] {state}: {result.counts}")
        return result

    def finish(self) -> str:
        """Mark the run completed in run.json; returns the run folder."""
        self.record.finish("completed")
        print(f"report: {self.run_dir / 'report.md'}")
        return str(self.run_dir)
