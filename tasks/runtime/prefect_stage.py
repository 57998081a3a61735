"""The Prefect side of a stage: cache policy, task options, child processes, the `gpu` limit, UI progress.

A stage is two plain functions in its tasks/<stage>.py module: `<stage>_key(cfg, run_dir, *upstream)` says
where it writes and the content key its outputs are valid for (tasks/runtime/stage.py), and `<stage>_stage(...)`
computes or reuses them. `stage_task` turns that pair into a Prefect task:

- StageCachePolicy keys Prefect's cache record by that content key and the output folder, so a cached stage is
  found again by a new flow run, after a server restart or a crash (Prefect's default policy only reuses
  work inside one flow run and ignores edits to helper modules). The flow refreshes the record when the folder
  no longer holds valid outputs (deleted, damaged, forced), so a hit never hands on a dead path.
- GPU stages run in a child process (`python -m alma_r.tasks.runtime.stage_process`), or as a flow run of a GPU
  deployment, holding one slot of the global concurrency limit `run.gpu_limit` when the server has it (a
  local run without `alma-r setup` has none, and skips it silently); their loops report progress to the
  terminal (a child inherits the parent's stderr) and through a file that becomes a progress artifact
  (models/progress.py).
- Retries only for transient failures (network, a preempted child), never for bad data or a bug.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import CachePolicy

from alma_r.config import RunConfig, config_to_json
from alma_r.models.progress import ENV as PROGRESS_ENV
from alma_r.tasks.runtime.failures import UNEXPECTED, Failure, failure_from_exit
from alma_r.tasks.runtime.stage import StageKey, StageResult
from alma_r.tasks.runtime.stage_process import encode, is_transient

RETRIES = 2
logger = logging.getLogger(__name__)
_limits_found: dict[tuple[str, str], bool] = {}  # (server, limit name) -> exists


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache key = the stage's content key (config section, code, upstream keys, input files) + folder."""

    key_fn: Callable[..., StageKey] | None = None

    def compute_key(self, task_ctx, inputs: dict, flow_parameters: dict, **kwargs) -> str | None:
        where = self.key_fn(**inputs)
        folder = hashlib.sha256(str(Path(where.out_dir).resolve()).encode()).hexdigest()[:12]
        return f"alma-r-{where.stage}-{where.key}-{folder}"


class StageProcessError(RuntimeError):
    """A stage that failed in another process. `failure` is the child's own classification (kind, one-line
    message; tasks/runtime/failures.py); the child's traceback is attached as a note, so that every traceback
    of this error (the run's log, a worker's console) shows where the stage really failed."""

    def __init__(
        self,
        message: str,
        transient: bool,
        failure: Failure | None = None,
        child_traceback: str | None = None,
    ):
        super().__init__(message)
        self.transient = transient
        self.failure = failure
        if child_traceback:
            self.add_note(f"The stage process's traceback:\n{child_traceback.rstrip()}")


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: only failures that may pass on their own are retried."""
    try:
        state.result()
    except StageProcessError as err:
        return err.transient
    except BaseException as err:
        return is_transient(err)  # a stage that ran in the flow's process: the same rule as in a child
    return False


def _die_with_parent() -> None:
    # A child must not outlive a killed flow: it would hold the GPU and write into a stage being rerun.
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def stage_request(fn: Callable, cfg: RunConfig, run_dir: Path, args: tuple) -> dict:
    return {
        "module": fn.__module__,
        "function": fn.__name__,
        "config": config_to_json(cfg),
        "run_dir": str(run_dir),
        "args": [encode(a) for a in args],
    }


def scratch_dir(run_dir: Path) -> Path:
    """Where stage requests, responses and progress files live while a stage runs."""
    return Path(run_dir) / ".scratch"


def clear_scratch(run_dir: Path) -> None:
    """A flow run starts by removing what a killed run left in the scratch folder (a half-written progress
    file, an unanswered request): nothing in it outlives the stage that wrote it."""
    shutil.rmtree(scratch_dir(run_dir), ignore_errors=True)


def run_in_child_process(name: str, request: dict, run_dir: Path, progress: Path) -> StageResult:
    """Run the stage in `python -m alma_r.tasks.runtime.stage_process`, wait, and read its StageResult."""
    exchange = scratch_dir(run_dir)
    exchange.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    request_path, response_path = exchange / f"{tag}.request.json", exchange / f"{tag}.response.json"
    request_path.write_text(json.dumps(request))
    env = {**os.environ, PROGRESS_ENV: str(progress)}
    child = subprocess.Popen(
        [sys.executable, "-m", "alma_r.tasks.runtime.stage_process", str(request_path), str(response_path)],
        env=env,
        preexec_fn=_die_with_parent,
    )
    try:
        code = child.wait()
    finally:
        if child.poll() is None:  # the task was cancelled or interrupted: take the child down with it
            child.kill()
            child.wait()
    try:
        response = json.loads(response_path.read_text()) if response_path.is_file() else {}
    finally:
        request_path.unlink(missing_ok=True)
        response_path.unlink(missing_ok=True)
    if code == 0 and "result" in response:
        return StageResult(**response["result"])
    if "error" in response:
        raise StageProcessError(
            f"[{name}] {response['error']}",
            transient=response["transient"],
            failure=Failure(response.get("kind", UNEXPECTED), response.get("message", response["error"])),
            child_traceback=response.get("traceback"),
        )
    # Killed by a signal (preempted, OOM killer) or died without a word: the stage may pass on another try.
    raise StageProcessError(
        f"[{name}] stage process ended with exit code {code}",
        transient=code < 0,
        failure=failure_from_exit(code),
    )


def run_on_deployment(name: str, request: dict, deployment: str) -> StageResult:
    """Run the stage as a flow run of `deployment` (flows/stage_flow.py) on a GPU work pool and wait for it."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name=deployment, parameters={"request": request}, timeout=None, tags=[name])
    state = flow_run.state
    if state is None or not state.is_completed():
        raise StageProcessError(
            f"[{name}] flow run {flow_run.name} of {deployment} ended {state.name if state else 'unknown'}",
            transient=bool(state and state.is_crashed()),
        )
    return StageResult(**state.result())


class ProgressArtifact:
    """Mirrors a stage's progress file into a Prefect progress artifact while the stage runs."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.stop = threading.Event()
        # Held while an update is in flight: once __exit__ has set `stop` under it, no stale poll update can
        # land after the final one (a slow API call on a busy machine outlived the join's timeout).
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.artifact = None

    def __enter__(self):
        self.path.unlink(missing_ok=True)
        try:
            from prefect.artifacts import create_progress_artifact

            self.artifact = create_progress_artifact(0.0, description=f"{self.name}: starting")
        except Exception:  # outside a Prefect run (tests, the CLI): no UI to update
            return self
        self.thread.start()
        return self

    def _poll(self):
        from prefect.artifacts import update_progress_artifact

        last = None
        while not self.stop.wait(2.0):
            last = self._update(update_progress_artifact, last)

    def _update(self, update, last=None):
        with self.lock:
            if self.stop.is_set():  # the final state is __exit__'s to write
                return last
            return self._update_locked(update, last)

    def _update_locked(self, update, last):
        try:
            state = json.loads(self.path.read_text())
            if state != last:
                update(
                    self.artifact,
                    100.0 * state["done"] / max(state["total"], 1),
                    description=f"{self.name}: {state['what']} {state['done']}/{state['total']}",
                )
            return state
        except Exception:  # no progress file yet, or the API hiccuped: try again at the next tick
            return last

    def __exit__(self, *exc):
        with self.lock:
            self.stop.set()
        if self.artifact is not None:
            from prefect.artifacts import update_progress_artifact

            self.thread.join(timeout=5)
            ended = "ended" if exc[0] is None else f"failed ({exc[0].__name__})"
            for _attempt in range(3):  # the final state matters most: a busy API gets two more tries
                try:
                    update_progress_artifact(
                        self.artifact, 100.0 if exc[0] is None else 0.0, description=f"{self.name}: {ended}"
                    )
                    break
                except Exception:
                    time.sleep(1.0)
        self.path.unlink(missing_ok=True)


def concurrency_limit_exists(name: str) -> bool:
    """Whether the Prefect server has the global concurrency limit `name`, asked once per server and process.
    A server that does not answer counts as having it: Prefect's own acquisition then decides (and says why)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    server = PREFECT_API_URL.value() or "ephemeral"
    if (server, name) not in _limits_found:
        try:
            with get_client(sync_client=True) as client:
                client.read_global_concurrency_limit_by_name(name)
            _limits_found[server, name] = True
        except ObjectNotFound:
            _limits_found[server, name] = False
            logger.debug(
                "no concurrency limit %r on %s (`alma-r setup` creates it): GPU stages run without one",
                name,
                server,
            )
        except Exception:
            return True
    return _limits_found[server, name]


def gpu_slot(name: str):
    """One slot of the concurrency limit `name` while a GPU stage runs. Without the limit (a local run, no
    `alma-r setup`) nothing is acquired, silently: Prefect would warn on every stage that it skips it."""
    from prefect.concurrency.sync import concurrency

    if not concurrency_limit_exists(name):
        return contextlib.nullcontext()
    return concurrency(name, occupy=1, strict=False)


def run_gpu_stage(name: str, fn: Callable, cfg: RunConfig, run_dir: Path, args: tuple) -> StageResult:
    """A GPU stage holds a slot of the `gpu` limit and runs away from the flow's process."""
    scratch_dir(run_dir).mkdir(parents=True, exist_ok=True)
    progress = scratch_dir(run_dir) / f"progress-{name}-{uuid.uuid4().hex[:8]}.json"
    with gpu_slot(cfg.run.gpu_limit), ProgressArtifact(name, progress):
        if not cfg.run.stage_processes:
            os.environ[PROGRESS_ENV] = str(progress)
            try:
                return fn(cfg, run_dir, *args)
            finally:
                os.environ.pop(PROGRESS_ENV, None)
        request = stage_request(fn, cfg, run_dir, args)
        if cfg.run.stage_deployment:
            return run_on_deployment(name, request, cfg.run.stage_deployment)
        return run_in_child_process(name, request, run_dir, progress)


def stage_task(
    stage_fn: Callable[..., StageResult],
    key_fn: Callable[..., StageKey],
    *,
    gpu: bool = False,
    publish: Callable[[RunConfig, StageResult], None] | None = None,
):
    """The Prefect task of a stage. `publish(cfg, result)` runs in the flow's process after the stage (table
    artifacts), also when the stage itself ran elsewhere."""
    name = stage_fn.__name__.removesuffix("_stage").replace("_", "-")
    signature = inspect.signature(stage_fn)

    @functools.wraps(stage_fn)
    def body(*args, **kwargs) -> StageResult:
        bound = signature.bind(*args, **kwargs)
        cfg, run_dir, *upstream = bound.args
        if gpu:
            result = run_gpu_stage(name, stage_fn, cfg, Path(run_dir), tuple(upstream))
        else:
            result = stage_fn(cfg, Path(run_dir), *upstream)
        if publish is not None:
            publish(cfg, result)
        return result

    prefect_task = task(
        body,
        name=name,
        cache_policy=StageCachePolicy(key_fn=key_fn),
        persist_result=True,
        tags=["alma-r", f"stage:{name}", *(["gpu"] if gpu else [])],
        retries=RETRIES,
        retry_delay_seconds=10,
        retry_condition_fn=retry_if_transient,
    )
    prefect_task.stage_key = key_fn  # the flow checks the outputs with it before trusting a cache record
    return prefect_task
