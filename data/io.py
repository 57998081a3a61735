"""Atomic, validated Parquet I/O: no reader ever sees a partial file, no table leaves a stage off-contract."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alma_r.data.schemas import required_columns

# Where replaced outputs go instead of being deleted (a stage's outputs of an earlier key, a restarted trainer's
# checkpoints): beside the folder they came from, until `alma-r prune-cache` removes them.
SUPERSEDED = ".superseded"


class SchemaError(ValueError):
    """A table that breaks its contract; the message names the file, the row and the column."""


def atomic_path(path: Path):
    """A temp path in the same folder as `path` (so that os.replace is atomic); the caller renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_bytes_atomic(path: Path, payload: bytes) -> Path:
    path = Path(path)
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_figure_atomic(fig, path: Path, dpi: int = 90) -> Path:
    """A matplotlib figure as PNG, written under a temporary name and renamed into place, then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


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


def save_dir_atomic(out_dir: Path, write) -> Path:
    """Write a folder under a temporary name, then rename it into place: readers never see half a folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
