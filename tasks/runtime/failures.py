"""What kind of failure ended a run, and the one line that tells the operator about it.

Every expected failure is of one kind, and `alma-r` exits with that kind's status (listed in `alma-r --help`):

    config          2   an unknown key, a bad value, an unknown --force stage, checkpoints of another run
    input_data      3   a bad input file (misaligned, empty line, invalid UTF-8 or JSON), a table off its
                        schema, scores that cannot be trusted
    resource        4   a missing model or file, refused (pickle) weights, a server or the Hub not answering
    out_of_memory   5   torch or Python out of memory, or a stage process killed by SIGKILL (the kernel's
                        out-of-memory killer)
    interrupted   130   Ctrl-C or a termination signal
    unexpected      1   anything else: a bug, shown with its traceback

Out of memory has its own status rather than folding into `resource`: the cure differs (smaller batches or a
bigger machine, not a fixed path or a server), and a scheduler may want to retry only those elsewhere.

Classes are named, not imported: an error can only be an instance of a class whose module is already loaded,
so the check costs no imports (torch, httpx) in a process that never loaded them.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

CONFIG = "config"
INPUT_DATA = "input_data"
RESOURCE = "resource"
OUT_OF_MEMORY = "out_of_memory"
INTERRUPTED = "interrupted"
UNEXPECTED = "unexpected"

EXIT_CODES = {CONFIG: 2, INPUT_DATA: 3, RESOURCE: 4, OUT_OF_MEMORY: 5, INTERRUPTED: 130, UNEXPECTED: 1}

WHAT = {
    CONFIG: "config error (unknown key, bad value, unknown --force stage, checkpoints of another run)",
    INPUT_DATA: "input data error (misaligned files, empty line, invalid UTF-8/JSON, a table off its schema)",
    RESOURCE: "resource error (missing model or file, refused .bin weights, a server or the Hub not answering)",
    OUT_OF_MEMORY: "out of memory (torch/Python, or a stage process killed by the out-of-memory killer)",
    INTERRUPTED: "interrupted (Ctrl-C, SIGTERM)",
    UNEXPECTED: "unexpected error (a bug): printed with its traceback",
}

# Checked in this order: the first kind with a matching class wins.
CLASSES = {
    INTERRUPTED: ("builtins.KeyboardInterrupt", "prefect.exceptions.TerminationSignal"),
    CONFIG: (
        "alma_r.config.base.ConfigError",
        "pydantic_core._pydantic_core.ValidationError",
        "alma_r.models.train.checkpoints.CheckpointMismatch",  # checkpoints of another run: start over explicitly
    ),
    INPUT_DATA: (
        "alma_r.data.readers.IngestError",
        "alma_r.data.io.SchemaError",
        "alma_r.tasks.shared.scoring.ScoringError",
    ),
    OUT_OF_MEMORY: ("builtins.MemoryError", "torch.OutOfMemoryError"),
    RESOURCE: (
        "builtins.OSError",  # missing files and models, refused weights, ConnectionError, TimeoutError, the Hub
        "httpx.HTTPError",
        "huggingface_hub.errors.HFValidationError",  # a local model path that does not exist, read as a Hub id
        "alma_r.models.generate.openai_backend.EndpointError",
    ),
}

LESS_MEMORY = "smaller batch sizes, shorter max lengths or fewer worker processes need less memory"

# Messages of third-party errors can run to pages (torch's CUDA OOM advice, HTTP bodies).
MAX_FOREIGN_MESSAGE = 400


@dataclass(frozen=True)
class Failure:
    """One failure: its kind, the problem in one line (`<file>:<line>: <problem>` for bad input) and the stage
    it happened in (None outside a stage)."""

    kind: str
    problem: str
    stage: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]

    @property
    def expected(self) -> bool:
        """An expected failure is told in one line; an unexpected one keeps its traceback."""
        return self.kind != UNEXPECTED

    def line(self, details: str | None = None) -> str:
        """`alma-r: <stage>: <problem>` (`config` in place of a stage for a config error), plus where the
        traceback is when `details` says so."""
        where = self.stage or (CONFIG if self.kind == CONFIG else None)
        text = f"alma-r: {where}: {self.problem}" if where else f"alma-r: {self.problem}"
        return f"{text} ({details})" if details else text

    def to_json(self) -> dict:
        return {"kind": self.kind, "message": self.problem, "stage": self.stage, "exit_code": self.exit_code}


def _loaded(name: str):
    module, _, cls = name.rpartition(".")
    return getattr(sys.modules.get(module), cls, None)


def kind_of(err: BaseException) -> str:
    for kind, names in CLASSES.items():
        classes = tuple(c for c in map(_loaded, names) if c is not None)
        if classes and isinstance(err, classes):
            return kind
    return UNEXPECTED


def one_line(err: BaseException) -> str:
    """The error's message on one line. This project's errors already say `<file>:<line>: <problem>` or name
    the key; others are prefixed with their type (`ConnectionRefusedError: [Errno 111] ...`) and shortened."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if kind_of(err) == INTERRUPTED:
        return "interrupted"
    if type(err).__module__.startswith("alma_r."):
        return text or type(err).__name__
    if len(text) > MAX_FOREIGN_MESSAGE:
        text = text[: MAX_FOREIGN_MESSAGE - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


STAGE_ATTRIBUTE = "alma_r_stage"


def mark_stage(err: BaseException, stage: str) -> None:
    """Remember which stage raised `err` (the innermost one, when stages nest), for its one-line message."""
    if getattr(err, STAGE_ATTRIBUTE, None) is None:
        try:
            setattr(err, STAGE_ATTRIBUTE, stage)
        except AttributeError:  # an exception type with __slots__: the message goes without its stage
            pass


def classify(err: BaseException) -> Failure:
    """The failure `err` stands for. An error that carries a Failure (a stage process's, told by the child)
    keeps its kind and message."""
    stage = getattr(err, STAGE_ATTRIBUTE, None)
    carried = getattr(err, "failure", None)
    if isinstance(carried, Failure):
        return Failure(carried.kind, carried.problem, carried.stage or stage)
    kind, problem = kind_of(err), one_line(err)
    cause = err.__cause__
    while kind == UNEXPECTED and cause is not None:
        # `raise RuntimeError("Failed to reach API") from ConnectError(...)`: the kind of the explicit cause
        if kind_of(cause) != UNEXPECTED:
            kind, problem = kind_of(cause), f"{problem}, caused by {one_line(cause)}"
        cause = cause.__cause__
    if kind == OUT_OF_MEMORY:
        problem += f" ({LESS_MEMORY})"
    return Failure(kind, problem, stage)


def failure_from_exit(code: int) -> Failure:
    """A stage process that ended without a response: killed by a signal, or died without a word."""
    if code == -signal.SIGKILL:
        return Failure(
            OUT_OF_MEMORY,
            "the stage process was killed by SIGKILL, most likely by the kernel's out-of-memory killer "
            f"({LESS_MEMORY})",
        )
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return Failure(RESOURCE, f"the stage process was killed by {name}")
    return Failure(UNEXPECTED, f"the stage process ended with exit code {code} and no response")


def exit_code_help() -> str:
    """The exit statuses, for `alma-r --help` (the README's "Running it for real" says the same)."""
    rows = ["    0  success"]
    rows += [f"  {code:>3}  {WHAT[kind]}" for kind, code in sorted(EXIT_CODES.items(), key=lambda kv: kv[1])]
    return "exit status:\n" + "\n".join(rows)
