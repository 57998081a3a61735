"""The house rules that keep the code readable for the next engineer (docs/architecture.md): no source file over
500 lines, no method of a training recipe over 60 lines (torchtune-style: setup steps, a short train loop,
logging in helpers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("alma_r", "flows", "tasks", "models", "data", "benchmarks", "scripts")
RECIPES = ("models/train/recipe.py", "models/sequence/trainer.py")


def source_files() -> list[Path]:
    return sorted(p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py"))


def test_no_source_file_over_500_lines():
    long = {
        str(p.relative_to(REPO)): n for p in source_files() if (n := len(p.read_text().splitlines())) > 500
    }
    assert source_files() and not long, f"split these files: {long}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_no_recipe_function_over_60_lines(recipe):
    tree = ast.parse((REPO / recipe).read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    long = {n.name: n.end_lineno - n.lineno + 1 for n in functions if n.end_lineno - n.lineno + 1 > 60}
    assert functions and not long, f"{recipe}: split these functions: {long}"
