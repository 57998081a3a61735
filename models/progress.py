"""Progress of a long loop, for the terminal and for the Prefect UI: one call, `report(done, total, what, ...)`.

A loop calls `report(0, total, what)` before its first unit of work (so that rates count from the real start)
and `report(done, total, what, **numbers)` after each one. Each call goes to:

- the terminal (stderr): a tqdm bar when stderr is a TTY; otherwise (CI logs, `alma-r run 2>log`) a plain line
  at most every ALMA_R_PROGRESS_INTERVAL seconds (default 15; `off` prints none) and always at the end, e.g.

      train step 120/400 loss 3.21 nll 2.10 margin 0.80 12.3 pairs/s eta 3m10s

  with `numbers` in the order given. A number whose name ends in `/s` is a rate the loop measured itself
  (`**{"pairs/s": 12.3}`) and replaces the rate this module measures (`unit`s of `done` per second); the ETA
  always comes from the measured rate of `done`. A stage run in a child process inherits the parent's stderr,
  so its lines reach the same terminal.
- the Prefect UI: when the stage runner has set ALMA_R_PROGRESS (a file path), the count is written there
  atomically, at most once a second and always at the end, and the runner turns it into a progress artifact.

A loop is known by `what`: the same `what` with a count lower than its last one starts it again. Nothing here
ever fails the work: progress is a convenience.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from alma_r.data.files import write_json_atomic

ENV = "ALMA_R_PROGRESS"  # the progress file of the Prefect artifact, set by the stage runner
INTERVAL_ENV = "ALMA_R_PROGRESS_INTERVAL"  # seconds between plain lines when stderr is not a TTY; "off": none
DEFAULT_INTERVAL = 15.0
ARTIFACT_INTERVAL = 1.0
FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 20  # the size of a terminal that does not say its own

_lock = threading.Lock()
_last_write = 0.0


def interval_from_env() -> float | None:
    """Seconds between plain progress lines (ALMA_R_PROGRESS_INTERVAL), or None for no terminal progress."""
    raw = os.environ.get(INTERVAL_ENV, "").strip().lower()
    if raw in ("off", "none", "no", "false"):
        return None
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float) -> str:
    """3m10s, 45s, 2h05m: short enough for a log line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_number(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if 0.01 <= abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def format_rate(rate: float) -> str:
    """12.3, 250, 0.052: three significant digits at most, never an exponent."""
    if rate >= 100:
        return f"{rate:.0f}"
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


@dataclass
class Loop:
    """One loop's progress as the terminal sees it."""

    total: int
    start_done: int
    start_time: float
    last_done: int
    last_line: float  # when the last plain line was printed (the start counts as one)
    bar: object = None  # the tqdm bar on a TTY

    def rate(self, done: int, now: float) -> float | None:
        elapsed = now - self.start_time
        return (done - self.start_done) / elapsed if elapsed > 0 and done > self.start_done else None


class TerminalProgress:
    """The terminal side of `report`: a tqdm bar per loop on a TTY, plain throttled lines otherwise.
    `stream`, `tty`, `interval` and `clock` default to stderr, its isatty(), ALMA_R_PROGRESS_INTERVAL and
    time.monotonic, each read when a loop reports (tests pass their own)."""

    def __init__(
        self, stream: TextIO | None = None, tty: bool | None = None, interval=..., clock=time.monotonic
    ):
        self._stream, self._tty, self._interval, self.clock = stream, tty, interval, clock
        self.loops: dict[str, Loop] = {}

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def is_tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def interval(self) -> float | None:
        return interval_from_env() if self._interval is ... else self._interval

    def update(self, done: int, total: int, what: str, unit: str, numbers: dict) -> None:
        interval = self.interval()
        if interval is None:
            return
        now = self.clock()
        loop = self.loops.get(what)
        if loop is None or done < loop.last_done or total != loop.total:
            if loop is not None:
                self._close(loop)
            loop = Loop(total=total, start_done=done, start_time=now, last_done=done, last_line=now)
            if self.is_tty():
                loop.bar = self._bar(done, total, what, unit)
            self.loops[what] = loop
        finished = done >= total
        if loop.bar is not None:
            self._update_bar(loop, done, numbers)
        elif finished or (done > loop.last_done and now - loop.last_line >= interval):
            print(self.line(loop, done, what, unit, numbers, now), file=self.stream, flush=True)
            loop.last_line = now
        loop.last_done = done
        if finished:
            self._close(loop)
            del self.loops[what]

    def line(self, loop: Loop, done: int, what: str, unit: str, numbers: dict, now: float) -> str:
        parts = [f"{what} {done}/{loop.total}"]
        parts += [f"{k} {format_number(v)}" for k, v in numbers.items() if not k.endswith("/s")]
        rates = {k: v for k, v in numbers.items() if k.endswith("/s")}
        rate = loop.rate(done, now)
        if rates:
            parts += [f"{format_rate(v)} {k}" for k, v in rates.items()]
        elif rate is not None:
            parts.append(f"{format_rate(rate)} {unit}/s")
        if done >= loop.total:
            parts.append(f"took {format_duration(now - loop.start_time)}")
        elif rate:
            parts.append(f"eta {format_duration((loop.total - done) / rate)}")
        return " ".join(parts)

    def _bar(self, done: int, total: int, what: str, unit: str):
        from tqdm import tqdm

        # A pseudo-terminal nobody sized (`script`, `docker run -t` in CI) reports 0 x 0, and tqdm then draws
        # nothing: such a terminal gets a fixed size instead of following its own.
        sized = self._columns() > 0
        return tqdm(
            total=total,
            initial=done,
            desc=what,
            unit=unit,
            file=self.stream,
            dynamic_ncols=sized,
            ncols=None if sized else FALLBACK_COLUMNS,
            nrows=None if sized else FALLBACK_ROWS,
        )

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return 0

    def _update_bar(self, loop: Loop, done: int, numbers: dict) -> None:
        if numbers:
            loop.bar.set_postfix({k: format_number(v) for k, v in numbers.items()}, refresh=False)
        loop.bar.update(done - loop.bar.n)

    def _close(self, loop: Loop) -> None:
        if loop.bar is not None:
            loop.bar.close()


terminal = TerminalProgress()


def _write_artifact_file(done: int, total: int, what: str) -> None:
    global _last_write
    path = os.environ.get(ENV)
    if not path:
        return
    now = time.monotonic()
    if done < total and now - _last_write < ARTIFACT_INTERVAL:
        return
    _last_write = now
    write_json_atomic(path, {"done": done, "total": total, "what": what})


def report(done: int, total: int, what: str = "", *, unit: str = "it", **numbers) -> None:
    """`done` of `total` units of the loop `what` are done; `numbers` (loss=3.21, **{"pairs/s": 12.3}) are
    shown beside the count. A no-op for an empty loop; never raises."""
    if total <= 0:
        return
    try:
        with _lock:
            terminal.update(done, total, what, unit, numbers)
            _write_artifact_file(done, total, what)
    except Exception:  # a closed stream, an unwritable scratch folder: never fail the work over progress
        pass
