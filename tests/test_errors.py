"""Every expected failure ends `alma-r` with one line on stderr and its kind's exit status (tasks/runtime/failures.py,
alma_r/cli/failure_report.py); the traceback goes to `<run>/logs/alma-r.log`, and to the terminal with --debug.

The table runs the real `alma-r run` (a subprocess, against one Prefect server for the module) on each bad input
of tests/test_readers.py, a config typo, an unknown --force stage, a missing local model path and a model folder
with only pickle weights. Each fails at ingest or at model loading, before any training; the missing model fails
in the generate stage's child process, so its message comes back through the child's response, the pickle
weights in the flow's own process (run.stage_processes: false).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from alma_r.tasks.runtime import failures
from tests.conftest import REPO
from tests.test_readers import write_lines

ALMA_R = REPO / ".venv" / "bin" / "alma-r"
ALMA_R_CMD = [str(ALMA_R)] if ALMA_R.is_file() else [sys.executable, "-m", "alma_r.cli"]
GOOD_DE = ["Guten Morgen.", "Wie geht es dir?", "Danke, gut."]
GOOD_EN = ["Good morning.", "How are you?", "Fine, thanks."]


def aligned(folder: Path, de: list[str] | bytes = GOOD_DE, en: list[str] | bytes = GOOD_EN, **kw) -> dict:
    """An aligned_text source of t.de/t.en written into `folder` (lines, or raw bytes for invalid UTF-8)."""
    for name, content in (("t.de", de), ("t.en", en)):
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            write_lines(folder / name, content)
    source = {"name": "hw", "kind": "aligned_text", "pair": "de-en", "split": "train"}
    return {**source, "files": {"de": "t.de", "en": "t.en"}, "directions": ["de-en"], **kw}


def alma_json(folder: Path, lines: list[str] | None = None, raw: bytes | None = None) -> dict:
    """An alma_json source p.json written into `folder`."""
    if raw is not None:
        (folder / "p.json").write_bytes(raw)
    else:
        write_lines(folder / "p.json", lines)
    return {"name": "val", "kind": "alma_json", "pair": "de-en", "path": "p.json", "directions": ["de-en"]}


def item(de="Hallo", en="Hello") -> str:
    return json.dumps({"translation": {"de": de, "en": en}})


@dataclass
class Case:
    """One bad run: the sources (written by `sources(folder)`), config sections and CLI arguments on top of a
    tiny config, the exit status, and what the last line of stderr starts with and contains."""

    name: str
    code: int
    prefix: str  # after `alma-r: `; {folder} is the case's folder
    fragments: tuple[str, ...] = ()
    sources: object = aligned
    sections: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()
    in_flow: bool = True  # the failure happens in a flow run: a log file and run.json record it


def malformed_json_list(folder: Path) -> dict:
    items = [{"translation": {"de": f"Satz {i}", "en": f"Sentence {i}"}} for i in range(3)]
    lines = json.dumps(items, indent=2).splitlines()
    lines[6] = lines[6].replace("}", "")  # the first item's closing brace: the error surfaces on line 8
    return alma_json(folder, lines)


KIND_OF_CODE = {code: kind for kind, code in failures.EXIT_CODES.items()}
INPUT = failures.EXIT_CODES[failures.INPUT_DATA]
CONFIG = failures.EXIT_CODES[failures.CONFIG]
RESOURCE = failures.EXIT_CODES[failures.RESOURCE]

CASES = [
    # the bad inputs of tests/test_readers.py
    Case(
        "misaligned",
        INPUT,
        "ingest: {folder}/t.en:3: ",
        ("misaligned", "t.de has 3 lines, t.en has 2"),
        lambda f: aligned(f, en=GOOD_EN[:2]),
    ),
    Case(
        "empty-line",
        INPUT,
        "ingest: {folder}/t.en:2: ",
        ("empty", "'en'"),
        lambda f: aligned(f, en=[GOOD_EN[0], "  ", GOOD_EN[2]]),
    ),
    Case(
        "invalid-utf8",
        INPUT,
        "ingest: {folder}/t.en:3: ",
        ("invalid UTF-8", "byte 6"),
        lambda f: aligned(f, en=b"Good morning.\nHow are you?\nFine, \xff\xfe thanks.\n"),
    ),
    Case(
        "direction-outside-pair",
        INPUT,
        "ingest: {folder}/t.de:0: ",
        ("'de-fr'", "'de-en'"),
        lambda f: aligned(f, directions=["de-en", "de-fr"]),
    ),
    Case(
        "json-empty-line",
        INPUT,
        "ingest: {folder}/p.json:2: ",
        ("empty line",),
        lambda f: alma_json(f, [item(), "", item("Tschüss", "Bye")]),
    ),
    Case(
        "json-empty-text",
        INPUT,
        "ingest: {folder}/p.json:2: ",
        ("'translation.de'", "empty"),
        lambda f: alma_json(f, [item(), item("  ", "Bye")]),
    ),
    Case(
        "json-invalid-utf8",
        INPUT,
        "ingest: {folder}/p.json:3: ",
        ("invalid UTF-8",),
        lambda f: alma_json(
            f, raw=(item() + "\n" + item() + "\n").encode() + b'{"translation": {"de": "\xc3"}}\n'
        ),
    ),
    Case(
        "json-malformed-line",
        INPUT,
        "ingest: {folder}/p.json:2: ",
        ("invalid JSON",),
        lambda f: alma_json(f, [item(), '{"translation": {"de": "Zwei", "en": "Two"}', item()]),
    ),
    Case("json-malformed-list", INPUT, "ingest: {folder}/p.json:8: ", ("invalid JSON",), malformed_json_list),
    Case(
        "json-missing-field",
        INPUT,
        "ingest: {folder}/p.json:2: ",
        ("'translation.en'", "missing"),
        lambda f: alma_json(f, [item(), json.dumps({"translation": {"de": "Zwei"}})]),
    ),
    Case(
        "json-missing-object",
        INPUT,
        "ingest: {folder}/p.json:2: ",
        ("'translation'",),
        lambda f: alma_json(f, [item(), json.dumps({"de": "x", "en": "y"})]),
    ),
    Case(
        "json-non-string",
        INPUT,
        "ingest: {folder}/p.json:1: ",
        ("'translation.en'", "int"),
        lambda f: alma_json(f, [json.dumps({"translation": {"de": "a", "en": 42}})]),
    ),
    # rejected by the config schema before Prefect starts: the config/field equivalent
    Case(
        "unknown-language",
        CONFIG,
        "config: {folder}/cfg.yaml: 'ingest.sources.0.pair': ",
        ("'xx'",),
        lambda f: aligned(f, pair="de-xx", directions=["de-xx"]),
        in_flow=False,
    ),
    Case(
        "config-typo",
        CONFIG,
        "config: {folder}/cfg.yaml: unknown key 'train.bta'",
        ("did you mean 'beta'",),
        sections={"train": {"bta": 0.1}},
        in_flow=False,
    ),
    Case(
        "unknown-force-stage",
        CONFIG,
        "config: force: unknown stage(s) ['trian']",
        ("stages are ingest",),
        args=("--force", "trian"),
        in_flow=False,
    ),
    # models: the generate stage's child process loads them and answers with the failure
    Case(
        "missing-model",
        RESOURCE,
        "generate: /nonexistent/model: no such model folder",
        sections={"model": {"base": "/nonexistent/model"}},
    ),
    Case(
        "pickle-weights",
        RESOURCE,
        "generate: {folder}/model: refused pytorch_model.bin",
        ("safetensors",),
        # run in the flow's process (run.stage_processes: false): the other path a GPU stage takes
        sections={"model": {"base": "{folder}/model"}, "run": {"stage_processes": False}},
    ),
]
DEBUG = Case(
    "misaligned-debug",
    INPUT,
    "ingest: {folder}/t.en:3: ",
    ("misaligned",),
    lambda f: aligned(f, en=GOOD_EN[:2]),
    args=("--debug",),
)


def pickle_model(tiny_model_dir: Path, folder: Path) -> None:
    """The tiny model with its weights as pytorch_model.bin (a pickle) instead of model.safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, folder / "model")
    weights = folder / "model" / "model.safetensors"
    torch.save(load_file(weights), folder / "model" / "pytorch_model.bin")
    weights.unlink()


def write_case(case: Case, folder: Path) -> Path:
    folder.mkdir(parents=True)
    sections = json.loads(json.dumps(case.sections).replace("{folder}", str(folder)))
    config = {
        "ingest": {"sources": [case.sources(folder)]},
        "generate": {"max_sources_per_lp": 2, "systems": [{"name": "greedy", "max_new_tokens": 4}]},
        **sections,
    }
    config["run"] = {"name": case.name, "root": "runs", **config.get("run", {})}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def run_case(case: Case, folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ALMA_R_CMD, "run", "--config", str(folder / "cfg.yaml"), *case.args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def outcomes(
    prefect_harness, tmp_path_factory, tiny_model_dir
) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case run once, three at a time, against the session's Prefect server (no temporary server each)."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("errors")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "INFO"}
    folders = {}
    for case in [*CASES, DEBUG]:
        folders[case.name] = root / case.name
        write_case(case, folders[case.name])
    pickle_model(tiny_model_dir, folders["pickle-weights"])
    slowest_first = sorted([*CASES, DEBUG], key=lambda c: "model" not in c.sections)  # they load a model
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = {c.name: pool.submit(run_case, c, folders[c.name], env) for c in slowest_first}
        return {name: (folders[name], run.result()) for name, run in runs.items()}


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def expected_start(case: Case, folder: Path) -> str:
    return "alma-r: " + case.prefix.replace("{folder}", str(folder.resolve()))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_expected_failure_ends_in_one_line_with_its_exit_status(outcomes, case):
    folder, done = outcomes[case.name]
    line = last_line(done.stderr)
    assert done.returncode == case.code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert line.startswith(expected_start(case, folder)), line
    for fragment in case.fragments:
        assert fragment in line, line
    log = folder / "runs" / case.name / "logs" / "alma-r.log"
    if not case.in_flow:
        assert not log.exists() and "traceback in" not in line
        return
    assert line.endswith(f" (traceback in {log.relative_to(folder)})"), line
    text = log.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text and line.split(" (traceback in ")[0] in text
    record = json.loads((folder / "runs" / case.name / "run.json").read_text())
    stage = case.prefix.split(":")[0]
    assert record["status"] == "failed" and record["stages"][stage]["kind"] == KIND_OF_CODE[case.code]
    assert record["failure"]["stage"] == stage and record["failure"]["exit_code"] == case.code


def test_a_failure_in_a_stage_process_keeps_the_childs_traceback_in_the_log(outcomes):
    folder, done = outcomes["missing-model"]
    text = (folder / "runs" / "missing-model" / "logs" / "alma-r.log").read_text(encoding="utf-8")
    assert "The stage process's traceback" in text and "ModelNotFoundError" in text
    assert "check_model_path" in text  # the frame in the child where it was raised


def test_debug_prints_the_traceback_and_still_ends_in_the_line(outcomes):
    folder, done = outcomes[DEBUG.name]
    assert done.returncode == DEBUG.code
    assert "Traceback (most recent call last)" in done.stderr and "IngestError" in done.stderr
    line = last_line(done.stderr)
    assert (
        line.startswith(expected_start(DEBUG, folder))
        and "misaligned" in line
        and "(traceback in" not in line
    )


# --------------------------------------------------------------------------------------- the taxonomy


def test_every_class_the_taxonomy_names_exists():
    import importlib

    for names in failures.CLASSES.values():
        for name in names:
            module, _, cls = name.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), cls), type), name


def raised(err: BaseException) -> BaseException:
    try:
        raise err
    except BaseException as caught:
        return caught


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: ConnectionRefusedError(111, "Connection refused"), failures.RESOURCE),
        (lambda: TimeoutError("timed out"), failures.RESOURCE),
        (lambda: __import__("httpx").ConnectError("no route"), failures.RESOURCE),
        (
            lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
            failures.OUT_OF_MEMORY,
        ),
        (lambda: MemoryError(), failures.OUT_OF_MEMORY),
        (lambda: KeyboardInterrupt(), failures.INTERRUPTED),
        (
            lambda: __import__("alma_r.tasks.shared.scoring", fromlist=["x"]).ScoringError("nan"),
            failures.INPUT_DATA,
        ),
        (
            lambda: __import__("alma_r.data.io", fromlist=["x"]).SchemaError("t.parquet: row 3"),
            failures.INPUT_DATA,
        ),
        (lambda: TypeError("a bug"), failures.UNEXPECTED),
    ],
)
def test_classify(make, kind):
    err = make()
    failure = failures.classify(err)
    assert (
        failure.kind == kind
        and failure.exit_code == failures.EXIT_CODES[kind]
        and "\n" not in failure.problem
    )


def test_an_error_raised_from_a_network_error_is_a_resource_error():
    """Prefect's `RuntimeError: Failed to reach API at ...` is raised from httpx's ConnectError."""
    import httpx

    try:
        try:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        except httpx.ConnectError as err:
            raise RuntimeError("Failed to reach API at http://127.0.0.1:9/api/") from err
    except RuntimeError as err:
        failure = failures.classify(err)
    assert failure.kind == failures.RESOURCE
    assert failure.problem == (
        "RuntimeError: Failed to reach API at http://127.0.0.1:9/api/, caused by ConnectError: [Errno 111] "
        "Connection refused"
    )
    assert failures.classify(raised(RuntimeError("a bug"))).kind == failures.UNEXPECTED  # no cause, no guess


def test_a_stage_process_killed_by_sigkill_is_out_of_memory():
    from alma_r.tasks.runtime.prefect_stage import StageProcessError

    killed = failures.failure_from_exit(-signal.SIGKILL)
    assert (
        killed.kind == failures.OUT_OF_MEMORY
        and killed.exit_code == 5
        and "out-of-memory killer" in killed.problem
    )
    assert failures.failure_from_exit(-signal.SIGTERM).problem == "the stage process was killed by SIGTERM"
    err = StageProcessError("[train] stage process ended with exit code -9", transient=True, failure=killed)
    failures.mark_stage(err, "train")
    assert failures.classify(err).line() == f"alma-r: train: {killed.problem}"


def test_unexpected_errors_keep_their_traceback(capsys):
    from alma_r.cli.failure_report import report_failure

    err = raised(TypeError("unsupported operand"))
    failures.mark_stage(err, "select")
    assert report_failure(err, None, debug=False) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("Traceback (most recent call last)")
    assert last_line(stderr) == "alma-r: select: TypeError: unsupported operand (traceback above)"


def test_interrupted_exits_130(capsys):
    from alma_r.cli.failure_report import report_failure

    assert report_failure(raised(KeyboardInterrupt()), None, debug=False) == 130
    assert capsys.readouterr().err == "alma-r: interrupted\n"


def test_help_documents_the_exit_statuses(capsys):
    from alma_r.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for kind, code in failures.EXIT_CODES.items():
        assert f"{code:>3}  {failures.WHAT[kind]}" in out


def test_a_stage_process_answers_with_the_kind_the_message_and_the_traceback(tmp_path, capfd):
    """The child writes its failure into the response and prints no traceback (the parent tells the user)."""
    from alma_r.config import load_config
    from alma_r.tasks.ingest import ingest_stage
    from alma_r.tasks.runtime import stage_process
    from alma_r.tasks.runtime.prefect_stage import stage_request

    cfg = load_config(None, ["ingest.sources=[]", f"run.root={tmp_path}"])
    request = tmp_path / "request.json"
    request.write_text(json.dumps(stage_request(ingest_stage, cfg, tmp_path / "run", ())))
    assert stage_process.main(str(request), str(tmp_path / "response.json")) == 1
    response = json.loads((tmp_path / "response.json").read_text())
    assert response["kind"] == failures.INPUT_DATA and response["transient"] is False
    assert response["message"].startswith("<config>:0: ingest.sources is empty")
    assert "Traceback (most recent call last)" in response["traceback"]
    assert "Traceback" not in capfd.readouterr().err
