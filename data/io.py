"""Atomic, validated Parquet I/O: no reader ever sees a partial file, no table leaves a stage off-contract."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alma_r.data.files import atomic_path
from alma_r.data.schemas import required_columns


class SchemaError(ValueError):
    """A table that breaks its contract; the message names the file, the row and the column."""


def _validate(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing}; expected {schema.names}")
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise SchemaError(f"{where}: unexpected column(s) {extra}; expected {schema.names}")
    table = table.select(schema.names)
    # Nulls first: a cast to a non-nullable field would fail without naming the row.
    for name in required_columns(schema):
        column = table.column(name)
        if column.null_count:
            row = column.is_null().to_pylist().index(True)
            raise SchemaError(f"{where}: row {row}: field '{name}' is null but required")
    try:
        table = table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError) as err:
        raise SchemaError(f"{where}: column types do not match the contract: {err}") from None
    return table


def to_table(
    rows: Iterable[Mapping[str, Any]] | pa.Table, schema: pa.Schema, where: str = "<table>"
) -> pa.Table:
    if isinstance(rows, pa.Table):
        return _validate(rows, schema, where)
    rows = list(rows)
    for i, row in enumerate(rows):
        unknown = set(row) - set(schema.names)
        if unknown:
            raise SchemaError(f"{where}: row {i}: unexpected field(s) {sorted(unknown)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    for field in schema:
        if pa.types.is_integer(field.type):
            for i, value in enumerate(columns[field.name]):
                if isinstance(value, float):  # pyarrow would silently truncate 2.5 to 2
                    raise SchemaError(
                        f"{where}: row {i}: field '{field.name}' is {value!r}, expected an integer"
                    )
    try:
        table = pa.table(columns, schema=schema.remove_metadata())
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise SchemaError(f"{where}: {err}") from None
    return _validate(table, schema, where)


def write_table(rows: Iterable[Mapping[str, Any]] | pa.Table, path: Path, schema: pa.Schema) -> Path:
    """Validate `rows` against `schema`, then write them to `path` atomically (temp file + rename)."""
    path = Path(path)
    table = to_table(rows, schema, where=str(path))
    tmp = atomic_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
    """Read a Parquet file and check it against `schema`; a broken or off-contract file raises SchemaError."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise SchemaError(f"{path}: not a readable Parquet file: {err}") from None
    return _validate(table, schema, str(path))


def read_rows(path: Path, schema: pa.Schema) -> list[dict[str, Any]]:
    return read_table(path, schema).to_pylist()
