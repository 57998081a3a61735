"""Progress in the terminal (models/progress.py) and quiet local runs (tasks/runtime/prefect_stage.py).

Unit tests of the reporter (plain lines with rate and ETA at the configured interval when stderr is not a TTY,
a tqdm bar on a TTY, the Prefect artifact's file), the `gpu` limit held only when the server has it, then the
real `alma-r run` on a miniature demo config: with stderr a pipe it prints periodic progress lines for sft,
generate, train and evaluate (their GPU stages run in child processes) and no WARNING; under a pseudo-terminal
a rerun of the train stage draws a progress bar.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alma_r.models import progress
from alma_r.models.progress import TerminalProgress, format_duration
from tests.conftest import REPO
from tests.test_flow_e2e import MINI, mini_config


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def plain(monkeypatch):
    """report() printing plain lines (stderr not a TTY) every 10 s of a fake clock into a string."""
    stream, clock = io.StringIO(), Clock()
    monkeypatch.setattr(progress, "terminal", TerminalProgress(stream, tty=False, interval=10.0, clock=clock))
    return stream, clock


def test_plain_lines_come_at_the_interval_with_rate_and_eta_and_always_at_the_end(plain):
    stream, clock = plain
    progress.report(0, 40, "train step", unit="step")
    for step in range(1, 41):
        clock.now += 1.0  # one step a second
        progress.report(
            step, 40, "train step", unit="step", loss=3.2123, nll=2.1, margin=0.8, **{"pairs/s": 8.0}
        )
    lines = stream.getvalue().splitlines()
    assert lines == [
        "train step 10/40 loss 3.21 nll 2.10 margin 0.80 8.0 pairs/s eta 30s",
        "train step 20/40 loss 3.21 nll 2.10 margin 0.80 8.0 pairs/s eta 20s",
        "train step 30/40 loss 3.21 nll 2.10 margin 0.80 8.0 pairs/s eta 10s",
        "train step 40/40 loss 3.21 nll 2.10 margin 0.80 8.0 pairs/s took 40s",
    ]


def test_without_a_rate_of_its_own_a_loop_gets_the_measured_one(plain):
    stream, clock = plain
    progress.report(0, 100, "generate greedy", unit="sentence")
    clock.now += 20.0
    progress.report(50, 100, "generate greedy", unit="sentence")
    clock.now += 20.0
    progress.report(100, 100, "generate greedy", unit="sentence")
    assert stream.getvalue().splitlines() == [
        "generate greedy 50/100 2.5 sentence/s eta 20s",
        "generate greedy 100/100 2.5 sentence/s took 40s",
    ]


def test_a_loop_run_again_starts_its_count_and_clock_again(plain):
    stream, clock = plain
    for _ in range(2):
        progress.report(0, 4, "score chrf", unit="request")
        clock.now += 2.0
        progress.report(4, 4, "score chrf", unit="request")
    assert stream.getvalue().splitlines() == ["score chrf 4/4 2.0 request/s took 2s"] * 2


def test_the_interval_comes_from_the_environment(monkeypatch):
    stream, clock = io.StringIO(), Clock()
    monkeypatch.setattr(progress, "terminal", TerminalProgress(stream, tty=False, clock=clock))
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    for step in range(4):
        clock.now += 1.0
        progress.report(step, 3, "train step", unit="step")
    assert len(stream.getvalue().splitlines()) == 3  # every step after the start
    monkeypatch.setenv(progress.INTERVAL_ENV, "off")
    progress.report(0, 3, "sft step")
    progress.report(3, 3, "sft step")
    assert len(stream.getvalue().splitlines()) == 3
    monkeypatch.delenv(progress.INTERVAL_ENV)
    assert progress.interval_from_env() == progress.DEFAULT_INTERVAL


def test_a_tty_gets_a_bar_with_the_numbers(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(progress, "terminal", TerminalProgress(stream, tty=True, interval=10.0))
    progress.report(0, 5, "train step", unit="step")
    for step in range(1, 6):
        progress.report(step, 5, "train step", unit="step", loss=0.5)
    out = stream.getvalue()
    assert re.search(r"train step: 100%\|[^|]+\| 5/5 \[.*step/s, loss=0\.50\]", out), out
    assert "eta" not in out  # no plain lines beside the bar


def test_the_artifact_file_is_still_written(monkeypatch, tmp_path, plain):
    path = tmp_path / "progress.json"
    monkeypatch.setenv(progress.ENV, str(path))
    progress.report(0, 10, "train step")
    progress.report(10, 10, "train step", loss=1.0)
    assert json.loads(path.read_text()) == {"done": 10, "total": 10, "what": "train step"}


def test_progress_never_fails_the_work(monkeypatch, tmp_path):
    stream = io.StringIO()
    stream.close()
    monkeypatch.setattr(progress, "terminal", TerminalProgress(stream, tty=False, interval=0.0))
    monkeypatch.setenv(progress.ENV, str(tmp_path / "no-such-folder" / "progress.json"))
    progress.report(1, 1, "train step")


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (0.4, 45, 190, 7500)] == ["0s", "45s", "3m10s", "2h05m"]


# ------------------------------------------------------------------------------------------------ the gpu limit
class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_the_gpu_limit_is_held_when_it_exists_and_skipped_silently_when_not(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.logging.configuration import ensure_logging_setup

    from alma_r.tasks.runtime.prefect_stage import gpu_slot

    ensure_logging_setup()  # it replaces the root logger's handlers: ours comes after it
    root, seen = logging.getLogger(), Records()
    root.addHandler(seen)
    level, root.level = root.level, logging.DEBUG
    try:
        for _ in range(2):
            with gpu_slot("h-absent-limit"):
                pass
    finally:
        root.removeHandler(seen)
        root.setLevel(level)
    warnings = [r.getMessage() for r in seen.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    said = [r for r in seen.records if "h-absent-limit" in r.getMessage() and r.name.startswith("alma_r")]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG  # once per process
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="h-present-limit", limit=1))
        with gpu_slot("h-present-limit"):
            held = client.read_global_concurrency_limit_by_name("h-present-limit").active_slots
        released = client.read_global_concurrency_limit_by_name("h-present-limit").active_slots
    assert (held, released) == (1, 0)


# ------------------------------------------------------------------------------------------------- end to end
ALMA_R = REPO / ".venv" / "bin" / "alma-r"
ALMA_R_CMD = [str(ALMA_R)] if ALMA_R.is_file() else [sys.executable, "-m", "alma_r.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RATE = r"[\d.]+ \S+/s (eta \S+|took \S+)$"
# One pattern per long loop of the demo: its count and a rate.
PROGRESS_LINES = {
    "sft": rf"^sft step \d+/8 loss [\d.]+ {RATE}",
    "generate": rf"^generate (greedy|sample) \d+/\d+ {RATE}",
    "train": rf"^train step \d+/3 loss [\d.-]+ nll [\d.-]+ margin [\d.e-]+ {RATE}",
    "evaluate": rf"^evaluate (baseline|cpo) \w\w-\w\w \d+/\d+ {RATE}",
}


def run_env(prefect_harness) -> dict:
    from prefect.settings import PREFECT_API_URL

    # INFO, as a user sees it (conftest quiets Prefect to WARNING); a line per report: a short run prints some.
    return {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOGGING_LEVEL": "INFO",
        progress.INTERVAL_ENV: "0",
    }


@pytest.fixture(scope="module")
def demo(prefect_harness, tmp_path_factory) -> tuple[list[str], dict, Path, subprocess.CompletedProcess]:
    """The miniature demo run by `alma-r run` with stdout and stderr pipes (not a TTY)."""
    config = mini_config(tmp_path_factory.mktemp("progress"))
    command = [*ALMA_R_CMD, "run", "--config", str(config), *[a for o in MINI for a in ("--set", o)]]
    env = run_env(prefect_harness)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=config.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return command, env, config.parent, done


@pytest.mark.parametrize("stage", list(PROGRESS_LINES))
def test_a_piped_run_prints_periodic_progress_lines(demo, stage):
    """A line for each stage's loops, with its count and rate; the training loops (several steps) print lines
    on the way (with an ETA), every loop one at its end."""
    *_, done = demo
    lines = [line for line in done.stderr.splitlines() if re.search(PROGRESS_LINES[stage], line)]
    assert any(" took " in line for line in lines), done.stderr[-3000:]
    if stage in ("sft", "train"):
        assert any(" eta " in line for line in lines), lines


def test_a_piped_demo_run_prints_no_warning(demo):
    *_, done = demo
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "WARNING" in line]
    assert not warnings, warnings


def run_in_pty(command: list[str], env: dict, cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `command` with stdout and stderr a pseudo-terminal; returns its status and output. Nobody sets the
    terminal's size, as under `script` or `docker run -t` in CI: it reports 0 x 0."""
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks: list[bytes] = []

    def drain():  # a full pty buffer would block the child
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer has closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        code = child.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    reader.join(timeout=10)
    os.close(leader)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def test_a_terminal_gets_a_progress_bar(demo):
    """Only the train stage runs again (its outputs are recomputed, the stages after it keep their cache)."""
    command, env, folder, _ = demo
    code, out = run_in_pty([*command, "--force", "train"], env, folder, timeout=300)
    text = ANSI.sub("", out)
    assert code == 0, text[-3000:]
    assert re.search(r"train step: +100%\|[^|\n]+\| 3/3 \[", text), text[-3000:]
    assert not re.search(r"^train step \d+/3 ", text, re.MULTILINE), "plain lines beside the bar"
