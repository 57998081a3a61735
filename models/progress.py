"""Progress of a long loop, for the Prefect UI: a loop calls `report(done, total)`; when the stage runner has set
ALMA_R_PROGRESS (a file path), the count is written there atomically, at most once a second, and the runner turns
it into a progress artifact. Without the variable this is a no-op, so library code can call it freely."""

from __future__ import annotations

import os
import time

from alma_r.data.io import write_json_atomic

ENV = "ALMA_R_PROGRESS"
_last_write = 0.0


def report(done: int, total: int, what: str = "") -> None:
    global _last_write
    path = os.environ.get(ENV)
    if not path or total <= 0:
        return
    now = time.monotonic()
    if done < total and now - _last_write < 1.0:
        return
    _last_write = now
    try:
        write_json_atomic(path, {"done": done, "total": total, "what": what})
    except OSError:
        pass  # progress is a convenience: never fail the work over it
