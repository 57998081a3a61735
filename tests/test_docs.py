"""The documents that promise things: data-contracts.md lists exactly the columns of data/schemas.py."""

from __future__ import annotations

import re

import pytest

from alma_r.data.schemas import ALL, required_columns
from tests.conftest import REPO


def contract_tables() -> dict[str, list[tuple[str, str, str]]]:
    text = (REPO / "docs" / "data-contracts.md").read_text(encoding="utf-8")
    tables = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        name = section.splitlines()[0].strip().strip("`")
        rows = []
        in_table = False
        for line in section.splitlines():
            if line.startswith("| column | type | required | meaning |"):
                in_table = True
                continue
            if in_table:
                if not line.startswith("|"):
                    break
                cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
                if set(cells[0]) <= {"-", ":"}:
                    continue
                rows.append((cells[0], cells[1], cells[2]))
        if rows:
            tables[name] = rows
    return tables


@pytest.mark.parametrize("name", sorted(ALL))
def test_data_contracts_doc_matches_schema(name):
    documented = contract_tables()
    assert name in documented, f"docs/data-contracts.md has no '## {name}' table"
    schema = ALL[name]
    assert [c for c, _, _ in documented[name]] == schema.names
    for column, dtype, required in documented[name]:
        assert dtype == str(schema.field(column).type), column
        assert required.lower().startswith(
            "required" if column in required_columns(schema) else "nullable"
        ), column


def test_readme_first_screen_gives_the_two_commands():
    first_screen = "\n".join((REPO / "README.md").read_text(encoding="utf-8").splitlines()[:20])
    assert "make demo" in first_screen and "make test" in first_screen
    assert "make test" in (REPO / ".ci" / "run").read_text()
