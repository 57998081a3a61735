"""The layer rules of pyproject.toml's [tool.importlinter] hold on the repository, and each one catches the import
it forbids: a deliberately wrong import, added to a temporary copy of the sources, makes scripts/lint_imports.py
fail naming the broken contract (each run takes about a second)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "lint_imports.py"
SOURCES = ("alma_r", "flows", "tasks", "models", "data")


def lint(root: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True, timeout=300
    )


def test_the_repository_keeps_every_contract():
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "BROKEN" not in result.stdout


@pytest.fixture(scope="module")
def pristine_copy(tmp_path_factory) -> Path:
    """The package sources and pyproject.toml, without data samples or bytecode (copied once per module)."""
    root = tmp_path_factory.mktemp("sources")
    for name in SOURCES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "sample"))
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


# The contracts' names in pyproject.toml (the report starts its line for a contract with the name).
NO_PREFECT = "Models, data and the config know nothing of Prefect"
NO_ARGPARSE = "Only the CLI parses command lines (argparse)"
INDEPENDENT_STAGES = "Stages are independent of each other"
# id -> (module, the import added to it, the contract it breaks)
FORBIDDEN_IMPORTS = {
    "prefect-in-models": ("models/loading.py", "import prefect", NO_PREFECT),
    "prefect-in-data": ("data/io.py", "from prefect import task", NO_PREFECT),
    "argparse-in-a-stage": ("tasks/ingest.py", "import argparse", NO_ARGPARSE),
    "config-in-models": ("models/prompts.py", "from alma_r.config import RunConfig", "Layers:"),
    "stage-to-stage": ("tasks/train.py", "from alma_r.tasks import select", INDEPENDENT_STAGES),
    "sequence-stage-to-stage": (
        "tasks/sequence/judge.py",
        "import alma_r.tasks.sequence.evaluate",
        INDEPENDENT_STAGES,
    ),
}


@pytest.mark.parametrize(("module", "line", "contract"), FORBIDDEN_IMPORTS.values(), ids=FORBIDDEN_IMPORTS)
def test_a_forbidden_import_breaks_its_contract(pristine_copy, tmp_path, module, line, contract):
    root = tmp_path / "repo"
    shutil.copytree(pristine_copy, root)
    path = root / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # deliberately wrong\n", encoding="utf-8")
    result = lint(root)
    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith(" BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), result.stdout
    # The report names the offending import, module and line.
    assert f"alma_r.{module.removesuffix('.py').replace('/', '.')} ->" in result.stdout, result.stdout
