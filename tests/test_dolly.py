"""Dolly-style instruction data (data/dolly.py): the three containers, the prompt template, validation errors
that name file, line and field, and a split that does not move when rows are added."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alma_r.data.dolly import DollyConfig, build_prompt, ingest_dolly, read_dolly, split_of
from alma_r.data.io import read_rows
from alma_r.data.readers import IngestError
from alma_r.data.schemas import INSTRUCTIONS
from tests.conftest import REPO

SAMPLE = REPO / "tests" / "data" / "dolly_sample.jsonl"


def sample_records() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def test_jsonl_sample_rows():
    rows = read_dolly(SAMPLE)
    assert [r["id"] for r in rows] == [f"dolly_sample:{i}" for i in range(1, 9)]
    assert {r["origin"] for r in rows} == {"dolly_sample"} and {r["split"] for r in rows} <= {"train", "test"}
    assert rows[0]["prompt"] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is the boiling point of water at sea level?\n\n### Response:"
    )
    assert rows[0]["context"] is None and rows[0]["category"] == "open_qa"
    assert rows[1]["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarise the "
        "paragraph in one sentence.\n\n### Input:\nThe river rose after three days of rain. Farmers moved "
        "their animals to higher ground, and the bridge was closed until the water fell.\n\n### Response:"
    )
    # Surrounding whitespace goes; inner newlines stay.
    assert rows[3]["instruction"] == "Who wrote the play from the passage?"
    assert rows[3]["context"] == "Hamlet is a tragedy written by William Shakespeare around 1600."
    assert rows[3]["response"] == "William Shakespeare."
    assert rows[5]["response"].count("\n") == 2 and rows[5]["context"] is None  # no context key, extra key
    assert rows[6]["context"] is None and rows[6]["category"] is None  # explicit nulls


def test_json_list_and_parquet_give_the_same_rows(tmp_path):
    records = sample_records()
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(records, indent=1), encoding="utf-8")
    as_parquet = tmp_path / "table.parquet"
    pq.write_table(pa.Table.from_pylist(records), as_parquet)
    expected = read_dolly(SAMPLE, DollyConfig(origin="d"))
    assert read_dolly(as_list, DollyConfig(origin="d")) == expected
    assert read_dolly(as_parquet, DollyConfig(origin="d")) == expected


def test_ingest_writes_the_contract_and_max_items(tmp_path):
    out = ingest_dolly(SAMPLE, tmp_path / "dolly" / "instructions.parquet", DollyConfig(max_items=3))
    rows = read_rows(out, INSTRUCTIONS)
    assert rows == read_dolly(SAMPLE)[:3]
    assert pq.read_schema(out).names == INSTRUCTIONS.names
    assert [p.name for p in out.parent.iterdir()] == ["instructions.parquet"]


def test_build_prompt_keeps_braces_and_treats_empty_context_as_none():
    prompt = build_prompt("Explain {x}.", "Use {y}.")
    assert "### Instruction:\nExplain {x}.\n\n### Input:\nUse {y}.\n\n### Response:" in prompt
    assert build_prompt("a", "") == build_prompt("a", None) == build_prompt("a")


GOOD = {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "missing.jsonl",
            [json.dumps(GOOD), json.dumps({"response": "x"})],
            "missing.jsonl:2: field 'instruction' is missing or null (has ['response'])",
        ),
        (
            "noresp.jsonl",
            [json.dumps({"instruction": "x"})],
            "noresp.jsonl:1: field 'response' is missing or null",
        ),
        (
            "empty.jsonl",
            [json.dumps(GOOD), json.dumps(GOOD), json.dumps({**GOOD, "response": " \n"})],
            "empty.jsonl:3: field 'response' is empty",
        ),
        (
            "emptyi.jsonl",
            [json.dumps({**GOOD, "instruction": ""})],
            "emptyi.jsonl:1: field 'instruction' is empty",
        ),
        (
            "ctx.jsonl",
            [json.dumps({**GOOD, "context": 3})],
            "ctx.jsonl:1: field 'context' is int, expected a string",
        ),
        (
            "cat.jsonl",
            [json.dumps({**GOOD, "category": ["a"]})],
            "cat.jsonl:1: field 'category' is list, expected a string",
        ),
        ("badjson.jsonl", [json.dumps(GOOD), '{"instruction": "x",'], "badjson.jsonl:2: invalid JSON"),
        (
            "blank.jsonl",
            [json.dumps(GOOD), "", json.dumps(GOOD)],
            "blank.jsonl:2: empty line where a JSON object was expected",
        ),
        (
            "notobj.jsonl",
            [json.dumps(GOOD), '["a", "b"]'],
            "notobj.jsonl:2: list where a JSON object was expected",
        ),
        (
            "list.json",
            [json.dumps([GOOD, {**GOOD, "instruction": 7}])],
            "list.json:2: field 'instruction' is int, expected a string",
        ),
        ("nothing.jsonl", [], "nothing.jsonl:0: no records"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in content), encoding="utf-8")
    with pytest.raises(IngestError) as err:
        read_dolly(path)
    assert str(err.value).startswith(f"{path}:") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_parquet_and_file_errors(tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "response": ["x", None]}), table)
    with pytest.raises(IngestError, match=r"t\.parquet:2: field 'response' is missing or null"):
        read_dolly(table)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(IngestError, match=r"broken\.parquet:0: not a readable Parquet file"):
        read_dolly(broken)
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"instruction": "Caf\xe9"}'.encode("latin-1"))
    with pytest.raises(IngestError, match=r"latin1\.jsonl:2: invalid UTF-8"):
        read_dolly(bad_utf8)
    with pytest.raises(IngestError, match=r"absent\.jsonl:0: file not found"):
        read_dolly(tmp_path / "absent.jsonl")


def test_split_is_seeded_and_close_to_the_fraction():
    rng = random.Random(0)
    instructions = [f"instruction {rng.random():.12f}" for _ in range(2000)]
    splits = [split_of(x) for x in instructions]
    # Binomial(2000, 0.5): sd ~ 22, so 1000 +- 100 fails only if the hash is broken.
    assert 900 < splits.count("test") < 1100
    assert 250 < [split_of(x, test_fraction=0.2) for x in instructions].count("test") < 550
    other_seed = [split_of(x, seed=1) for x in instructions]
    assert other_seed != splits and 900 < other_seed.count("test") < 1100
    assert {split_of(x, test_fraction=0.0) for x in instructions} == {"train"}
    assert {split_of(x, test_fraction=1.0) for x in instructions} == {"test"}
    # Whitespace around an instruction does not move it; repeated instructions share a split.
    assert split_of("  What is 2+2?\n") == split_of("What is 2+2?")


def test_adding_and_reordering_rows_moves_no_row_between_splits(tmp_path):
    records = sample_records()
    before = {r["instruction"]: r["split"] for r in read_dolly(SAMPLE)}
    grown = [{**GOOD, "instruction": f"New question {i}?"} for i in range(20)] + records[::-1]
    path = tmp_path / "grown.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in grown), encoding="utf-8")
    after = {r["instruction"]: r["split"] for r in read_dolly(path)}
    assert {k: after[k] for k in before} == before


PINNED_SPLITS = ["train", "train", "train", "test", "test", "test", "test", "train"]


def test_split_of_the_sample_is_pinned():
    # A change of the hash would silently reshuffle every existing train/test split: pin it.
    assert [r["split"] for r in read_dolly(SAMPLE)] == PINNED_SPLITS


def test_config_is_checked():
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        DollyConfig(test_fraction=1.5)
    with pytest.raises(ValueError, match="max_items=0"):
        DollyConfig(max_items=0)
