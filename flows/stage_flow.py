"""The `alma-r-stage` flow: one GPU stage of a build-alma-r run, on another machine.

With `run.stage_deployment: alma-r-stage/gpu`, build-alma-r hands each GPU stage (generate, score, train,
evaluate) to a deployment of this flow on the GPU work pool through `run_deployment` and waits for it; the
request is the same one a local child process gets (tasks/runtime/stage_process.py). Workers of that pool must see
the run folder at the same path (a shared filesystem).
"""

from __future__ import annotations

from prefect import flow

from alma_r.tasks.runtime.stage_process import run_request


@flow(name="alma-r-stage", log_prints=True, persist_result=True)
def alma_r_stage(request: dict) -> dict:
    """Run one stage from its request; returns its StageResult as JSON."""
    return run_request(request).to_json()
