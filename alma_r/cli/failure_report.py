"""How `alma-r` ends when something fails, and the run's log file.

An expected failure (its kind decided by tasks/runtime/failures.py) ends with one line on stderr and its kind's
exit status:

    alma-r: ingest: data/train.en:5: misaligned files: train.de has 5 lines, train.en has 4 (traceback in
    runs/tiny/logs/alma-r.log)

An unexpected one (a bug) prints its traceback, then the same kind of line. While a flow runs, every log
record (Prefect's, the stages') goes, traceback included, to `<run>/logs/alma-r.log`; the terminal gets the
records without their tracebacks, unless --debug asks for them.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alma_r.tasks.runtime.failures import CONFIG, INTERRUPTED, classify

LOG_FILE = Path("logs") / "alma-r.log"
LOG_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"
LOGGER = "alma_r.cli"
# Prefect logs this from an exit handler, after the run's last word; it tells a user nothing.
EXIT_NOISE = "Stopping temporary server on "


class WithoutTraceback(logging.Formatter):
    """A console formatter that prints a record as `inner` would, without its traceback or stack."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        bare = logging.makeLogRecord(record.__dict__)  # a copy: the log file still gets the traceback
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def drop_exit_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(EXIT_NOISE)


def console_handlers() -> list[logging.StreamHandler]:
    """The handlers that write to a terminal stream (Prefect's console handler among them), each once."""
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    found: dict[int, logging.StreamHandler] = {}
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                found[id(handler)] = handler
    return list(found.values())


@contextmanager
def run_log(run_dir: Path, debug: bool, command: list[str]) -> Iterator[Path]:
    """While a flow runs in `run_dir`: every record, with its traceback, is appended to `<run_dir>/logs/alma-r.log`
    (a rerun keeps the log of the failure before it), the console prints records without tracebacks (unless
    `debug`), and a failure's traceback is written to the log before it propagates. Yields the log's path."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()  # Prefect's console handler exists before it is told to drop tracebacks
    path = Path(run_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger(LOGGER)
    root = logging.getLogger()
    root.addHandler(to_file)
    logging.getLogger("prefect").addFilter(drop_exit_noise)  # for the rest of the process: it comes at exit
    swapped = [] if debug else [(h, h.formatter) for h in console_handlers()]
    for handler, formatter in swapped:
        handler.setFormatter(WithoutTraceback(formatter))
    to_file.handle(
        logger.makeRecord(LOGGER, logging.INFO, __file__, 0, f"alma-r {' '.join(command)}", (), None)
    )
    try:
        yield path
    except BaseException as err:
        failure = classify(err)
        record = logger.makeRecord(
            LOGGER, logging.ERROR, __file__, 0, failure.line(), (), (type(err), err, err.__traceback__)
        )
        to_file.handle(record)
        raise
    finally:
        for handler, formatter in swapped:
            handler.setFormatter(formatter)
        root.removeHandler(to_file)
        to_file.close()


def shown(path: Path) -> str:
    """A path as the user can type it: relative to the current folder when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def report_failure(err: BaseException, log: Path | None, debug: bool) -> int:
    """Tell the user what failed: one line for an expected failure (with --debug, after its traceback), the
    traceback and then the line for an unexpected one. Returns the exit status."""
    failure = classify(err)
    if debug or not failure.expected:
        traceback.print_exception(err, file=sys.stderr)  # with its notes: a stage process's own traceback
    if not failure.expected:
        details = "traceback above" + (f" and in {shown(log)}" if log else "")
    elif failure.kind in (CONFIG, INTERRUPTED) or debug:
        details = None  # the message says all there is
    else:
        details = f"traceback in {shown(log)}" if log else "--debug prints the traceback"
    sys.stderr.flush()
    print(failure.line(details), file=sys.stderr, flush=True)
    return failure.exit_code
