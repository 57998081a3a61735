"""Parquet I/O against the data contracts (data/io.py, data/schemas.py): validation and atomic writes
(data/files.py)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alma_r.data import files
from alma_r.data.files import write_json_atomic
from alma_r.data.io import SchemaError, read_rows, read_table, to_table, write_table
from alma_r.data.schemas import ALL, DROPPED, EVAL_RESULTS, SCORES, SEGMENTS, required_columns


def value_for(dtype: pa.DataType, field: str, i: int):
    if pa.types.is_string(dtype):
        return f"{field}-{i} ünï"
    if pa.types.is_float64(dtype):
        return 0.25 * i - 1.5
    if pa.types.is_int64(dtype):
        return 7 * i + 1
    raise AssertionError(f"no sample value for {dtype}")


def sample_rows(schema: pa.Schema, n: int = 3) -> list[dict]:
    """n rows with a value in every column, except that row 1 holds null in every optional column."""
    rows = []
    for i in range(n):
        row = {}
        for f in schema:
            row[f.name] = None if (f.nullable and i == 1) else value_for(f.type, f.name, i)
        rows.append(row)
    return rows


def no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def write_refused(data, path, schema) -> str:
    """The message of the SchemaError that write_table raises for data; it names the file, and neither the
    file nor a temporary file is left behind."""
    with pytest.raises(SchemaError) as exc:
        write_table(data, path, schema)
    msg = str(exc.value)
    assert str(path) in msg
    assert not path.exists() and no_temp_files(path.parent)
    return msg


def read_refused(path, schema) -> str:
    """The message of the SchemaError that read_table raises for the file; it names the file."""
    with pytest.raises(SchemaError) as exc:
        read_table(path, schema)
    msg = str(exc.value)
    assert str(path) in msg
    return msg


# -------------------------------------------------------------------------------------- the contracts


def test_schemas_declare_required_and_optional_columns():
    assert set(ALL) == {
        "segments",
        "candidates",
        "ingested_translations",
        "published_scores",
        "human_preferences",
        "scores",
        "pairs",
        "dropped",
        "eval_results",
        "hypotheses",
        "instructions",
    }
    assert "ref" not in required_columns(SEGMENTS) and "src" in required_columns(SEGMENTS)
    assert required_columns(DROPPED) == ["segment_id", "lp", "reason"]


@pytest.mark.parametrize("name", sorted(ALL))
def test_round_trip(tmp_path, name):
    schema = ALL[name]
    rows = sample_rows(schema)
    path = write_table(rows, tmp_path / f"{name}.parquet", schema)
    assert path == tmp_path / f"{name}.parquet"
    assert read_rows(path, schema) == rows
    table = read_table(path, schema)
    assert table.column_names == schema.names
    assert [f.type for f in table.schema] == [f.type for f in schema]
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("name", sorted(ALL))
def test_round_trip_of_an_arrow_table_with_shuffled_columns(tmp_path, name):
    schema = ALL[name]
    rows = sample_rows(schema)
    shuffled = list(reversed(schema.names))
    table = pa.table(
        {c: [r[c] for r in rows] for c in shuffled},
        schema=pa.schema([schema.field(c).with_nullable(True) for c in shuffled]),
    )
    path = write_table(table, tmp_path / "t.parquet", schema)
    assert read_rows(path, schema) == rows


def test_empty_table_round_trip(tmp_path):
    path = write_table([], tmp_path / "empty.parquet", DROPPED)
    assert read_rows(path, DROPPED) == []
    assert read_table(path, DROPPED).column_names == DROPPED.names


# ---------------------------------------------------------------------------------------- violations


def scores_row(**kw) -> dict:
    return {
        "segment_id": "s1",
        "lp": "de-en",
        "system": "greedy",
        "metric": "chrf",
        "model_id": "sig",
        "score": 55.5,
        "error_spans": None,
        "flag": None,
        **kw,
    }


def test_missing_column_on_write(tmp_path):
    path = tmp_path / "scores.parquet"
    table = pa.table({k: [v] for k, v in scores_row().items() if k != "metric"})
    msg = write_refused(table, path, SCORES)
    assert "missing" in msg and "'metric'" in msg


def test_missing_column_on_read(tmp_path):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({k: [v] for k, v in scores_row().items() if k != "score"}), path)
    msg = read_refused(path, SCORES)
    assert "missing" in msg and "'score'" in msg


def test_extra_field_in_a_row(tmp_path):
    path = tmp_path / "scores.parquet"
    rows = [scores_row(), scores_row(), scores_row(bogus=1)]
    msg = write_refused(rows, path, SCORES)
    assert "row 2" in msg and "'bogus'" in msg


def test_extra_column_on_read(tmp_path):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({k: [v] for k, v in scores_row(extra_col="x").items()}), path)
    msg = read_refused(path, SCORES)
    assert "unexpected" in msg and "'extra_col'" in msg


def test_null_in_an_optional_field_is_accepted(tmp_path):
    rows = [{"segment_id": "a", "lp": "de-en", "reason": "missing_score", "detail": None}]
    assert read_rows(write_table(rows, tmp_path / "d.parquet", DROPPED), DROPPED) == rows


def test_null_in_a_required_field_on_write(tmp_path):
    path = tmp_path / "dropped.parquet"
    rows = [{"segment_id": f"s{i}", "lp": "de-en", "reason": "r", "detail": None} for i in range(4)]
    rows[2]["reason"] = None
    msg = write_refused(rows, path, DROPPED)
    assert "row 2" in msg and "'reason'" in msg


def test_null_in_a_required_field_on_read(tmp_path):
    path = tmp_path / "dropped.parquet"
    pq.write_table(
        pa.table(
            {
                "segment_id": ["a", "b", "c"],
                "lp": ["de-en", None, "de-en"],
                "reason": ["r", "r", "r"],
                "detail": pa.array([None] * 3, pa.string()),
            }
        ),
        path,
    )
    msg = read_refused(path, DROPPED)
    assert "row 1" in msg and "'lp'" in msg


@pytest.mark.parametrize("bad", [{"score": "high"}, {"system": 5}, {"metric": 3.5}])
def test_wrong_type_on_write(tmp_path, bad):
    path = tmp_path / "scores.parquet"
    write_refused([scores_row(), scores_row(**bad)], path, SCORES)


def test_wrong_type_on_read(tmp_path):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({**{k: [v] for k, v in scores_row().items()}, "score": ["high"]}), path)
    msg = read_refused(path, SCORES)
    assert "type" in msg


# An evaluation row whose integer field n_segments holds a fraction.
FRACTIONAL_EVAL_ROW = {
    "test_set": "wmt22",
    "lp": "de-en",
    "system": "s",
    "metric": "bleu",
    "score": 30.0,
    "signature": "sig",
    "n_segments": 2.5,
}


def test_fractional_value_in_an_integer_column_is_refused(tmp_path):
    write_refused([FRACTIONAL_EVAL_ROW], tmp_path / "eval.parquet", EVAL_RESULTS)


def test_fractional_column_in_an_integer_field_on_read(tmp_path):
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({k: [v] for k, v in FRACTIONAL_EVAL_ROW.items()}), path)
    read_refused(path, EVAL_RESULTS)


@pytest.mark.parametrize("payload", [b"", b"segment_id,lp\ns1,de-en\n", b"PAR1 not really parquet"])
def test_not_a_parquet_file(tmp_path, payload):
    path = tmp_path / "scores.parquet"
    path.write_bytes(payload)
    read_refused(path, SCORES)


def test_missing_file_is_a_schema_error_naming_it(tmp_path):
    path = tmp_path / "nowhere.parquet"
    read_refused(path, SCORES)


# -------------------------------------------------------------------------------------------- atomicity


class Boom(RuntimeError):
    pass


def failing_write_table(table, where, *args, **kwargs):
    """Writes part of a file at `where` (the temp path), then dies."""
    with open(where, "wb") as f:
        f.write(b"PAR1 half a file")
    raise Boom("disk full")


def test_failed_write_leaves_no_target_and_no_temp_file(tmp_path, monkeypatch):
    seen = []

    def spy(table, where, *args, **kwargs):
        seen.append(where)
        failing_write_table(table, where)

    monkeypatch.setattr(pq, "write_table", spy)
    target = tmp_path / "out" / "segments.parquet"
    with pytest.raises(Boom):
        write_table(sample_rows(SEGMENTS), target, SEGMENTS)
    assert len(seen) == 1 and str(seen[0]) != str(target)  # it wrote to a temp path, not to the target
    assert str(seen[0]).startswith(str(target.parent))  # in the same folder (so the rename is atomic)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "segments.parquet"
    old = sample_rows(SEGMENTS, n=2)
    write_table(old, target, SEGMENTS)
    monkeypatch.setattr(pq, "write_table", failing_write_table)
    with pytest.raises(Boom):
        write_table(sample_rows(SEGMENTS, n=5), target, SEGMENTS)
    monkeypatch.undo()
    assert read_rows(target, SEGMENTS) == old
    assert [p.name for p in tmp_path.iterdir()] == ["segments.parquet"]


def test_failed_json_write_leaves_no_target_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "stats.json"

    def boom(*args, **kwargs):
        raise Boom("fsync failed")

    monkeypatch.setattr(files.os, "fsync", boom)
    with pytest.raises(Boom):
        write_json_atomic(target, {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_json_write_round_trip(tmp_path):
    import json

    target = write_json_atomic(tmp_path / "x.json", {"b": [1, 2], "a": "ü"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"b": [1, 2], "a": "ü"}
    assert "ü" in target.read_text(encoding="utf-8")  # not escaped
    assert no_temp_files(tmp_path)


def test_to_table_names_the_place_it_was_given():
    with pytest.raises(SchemaError, match=r"^somewhere: row 0: unexpected field"):
        to_table([{"nope": 1}], SCORES, where="somewhere")
