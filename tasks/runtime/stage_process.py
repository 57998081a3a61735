"""Run one stage in this process, from a request file written by tasks/runtime/prefect_stage.py:

    python -m alma_r.tasks.runtime.stage_process REQUEST.json RESPONSE.json

The request names the stage function, the validated config and the upstream StageResults; the response holds
the StageResult, or the error: whether it is transient (worth a retry), its kind and one-line message
(tasks/runtime/failures.py) and its traceback. The child prints no traceback itself: the parent tells the
operator in one line and keeps the traceback for the run's log. The same request runs a stage on
another machine through the `alma-r-stage` flow (flows/stage_flow.py).
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

from alma_r.config import config_from_json
from alma_r.data.files import write_json_atomic
from alma_r.tasks.runtime.failures import classify
from alma_r.tasks.runtime.stage import StageResult

# Errors worth retrying: the network or a service hiccuped; the same input may well succeed next time.
TRANSIENT = ConnectionError | TimeoutError


def encode(value):
    if isinstance(value, StageResult):
        return {"__stage_result__": value.to_json()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def decode(value):
    if isinstance(value, dict) and "__stage_result__" in value:
        return StageResult(**value["__stage_result__"])
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def is_transient(err: BaseException) -> bool:
    import httpx

    return isinstance(err, TRANSIENT | httpx.TransportError)


def run_request(request: dict) -> StageResult:
    fn = getattr(importlib.import_module(request["module"]), request["function"])
    cfg = config_from_json(request["config"])
    args = [decode(a) for a in request["args"]]
    return fn(cfg, Path(request["run_dir"]), *args)


def main(request_path: str, response_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    try:
        result = run_request(request)
    except BaseException as err:
        failure = classify(err)
        write_json_atomic(
            Path(response_path),
            {
                "error": f"{type(err).__name__}: {err}",
                "transient": is_transient(err),
                "kind": failure.kind,
                "message": failure.problem,
                "traceback": traceback.format_exc(),
            },
        )
        return 1
    write_json_atomic(Path(response_path), {"result": result.to_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
