"""Check the import contracts of pyproject.toml's [tool.importlinter] (layers, forbidden imports, independent
stages) with import-linter's `lint-imports`; exits with its status and prints its report.

    .venv/bin/python scripts/lint_imports.py [--root REPO]

import-linter builds its graph (with grimp) from the importable package `alma_r`, found on sys.path. The
installed package maps the top-level folders flows/ tasks/ models/ data/ to alma_r.flows, alma_r.tasks, ...
through setuptools' package-dir, which grimp cannot follow ("Module 'alma_r.models' does not exist"). So the
package is laid out as Python sees it in a temporary folder, alma_r/ with the mapped folders symlinked inside,
and lint-imports runs there with only that folder on PYTHONPATH: the repository given by --root is checked, not
whichever alma_r the environment has installed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "alma_r"


def package_dirs(root: Path) -> dict[str, Path]:
    """Each subpackage of alma_r that pyproject's package-dir maps to a folder of its own, by its short name."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    out = {}
    for name, folder in mapping.items():
        parent, _, child = name.rpartition(".")
        if parent == PACKAGE:
            out[child] = root / folder
    return out


def stage_package(root: Path, staging: Path) -> Path:
    """staging/alma_r: the entries of root/alma_r plus the package-dir folders, all symlinked (nothing copied:
    the check reads the repository's own files)."""
    package = staging / PACKAGE
    package.mkdir()
    for entry in (root / PACKAGE).iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    for name, folder in package_dirs(root).items():
        if (package / name).exists():
            raise SystemExit(f"lint_imports: {root / PACKAGE / name} and the mapped folder {folder} collide")
        (package / name).symlink_to(folder.resolve(), target_is_directory=True)
    return package


def lint_imports_command() -> str:
    """The lint-imports of the running interpreter's environment (the project venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "lint-imports"
    return str(beside) if beside.is_file() else "lint-imports"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=REPO, help="the repository to check (default: this one)")
    root = parser.parse_args(argv).root.resolve()
    with tempfile.TemporaryDirectory(prefix="alma-r-lint-imports-") as tmp:
        stage_package(root, Path(tmp))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PYTHONPATH"] = tmp
        cmd = [lint_imports_command(), "--no-cache", "--config", str(root / "pyproject.toml")]
        # cwd is the staging folder: Python puts the working directory first on sys.path, and from the
        # repository it would find the unmapped top-level folders (models/, tasks/, ...) as packages.
        return subprocess.run(cmd, cwd=tmp, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
