"""Ingest readers (data/readers.py) and the ingest stage (tasks/ingest.py).

Every input problem must stop with one line `<file>:<line>: <problem>`; a failed ingest leaves no output.
The positive cases read real slices of ALMA's human-written data, copied into tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alma_r.data.io import read_rows
from alma_r.data.readers import IngestError, read_aligned_text, read_alma_json
from alma_r.data.schemas import SEGMENTS
from tests.conftest import SHARED_DATA, needs_shared_data

HUMAN_WRITTEN = SHARED_DATA / "alma" / "human_written_data"
CSEN_JSONL = HUMAN_WRITTEN / "csen/train.cs-en.json"
DEEN_JSON_LIST = HUMAN_WRITTEN / "deen/valid.de-en.json"
DEEN_DE = HUMAN_WRITTEN / "deen/train.de-en.de"
DEEN_EN = HUMAN_WRITTEN / "deen/train.de-en.en"


def head_lines(path: Path, n: int) -> list[str]:
    """The first n lines of a (possibly large) UTF-8 file, without reading all of it."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(line.rstrip("\n"))
            if len(out) == n:
                break
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def assert_ingest_error(excinfo: pytest.ExceptionInfo, path: Path, line: int, *problem: str) -> str:
    """One line, starting with '<path>:<line>: ', containing every fragment of the problem."""
    assert excinfo.type is IngestError
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}:{line}: "), msg
    for fragment in problem:
        assert fragment in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def aligned(tmp_path) -> tuple[Path, Path]:
    de = write_lines(tmp_path / "t.de", ["Guten Morgen.", "Wie geht es dir?", "Danke, gut."])
    en = write_lines(tmp_path / "t.en", ["Good morning.", "How are you?", "Fine, thanks."])
    return de, en


def test_misaligned_files_name_the_shorter_file_and_its_missing_line(tmp_path):
    de = write_lines(tmp_path / "a.de", ["eins", "zwei", "drei"])
    en = write_lines(tmp_path / "a.en", ["one", "two"])
    with pytest.raises(IngestError) as exc:
        read_aligned_text(de, en, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, en, 3, "misaligned", "3", "2")

    # the other way round: the first file is the shorter one
    en_long = write_lines(tmp_path / "b.en", ["one", "two", "three", "four"])
    with pytest.raises(IngestError) as exc:
        read_aligned_text(de, en_long, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, de, 4, "misaligned", "4", "3")


def test_missing_final_newline_is_not_a_misalignment(tmp_path):
    de = tmp_path / "x.de"
    de.write_text("eins\nzwei", encoding="utf-8")  # no final newline
    en = write_lines(tmp_path / "x.en", ["one", "two"])
    rows = read_aligned_text(de, en, "de-en", ["de-en"], "train")
    assert [(r["src"], r["ref"]) for r in rows] == [("eins", "one"), ("zwei", "two")]


@pytest.mark.parametrize("side", ["de", "en"])
@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_empty_line_names_file_line_and_field(aligned, side, blank):
    de, en = aligned
    target = de if side == "de" else en
    lines = target.read_text(encoding="utf-8").splitlines()
    lines[1] = blank
    write_lines(target, lines)
    with pytest.raises(IngestError) as exc:
        read_aligned_text(de, en, "de-en", ["de-en", "en-de"], "train")
    assert_ingest_error(exc, target, 2, "empty", f"'{side}'")


def test_empty_line_in_json_lines_names_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "p.json",
        [
            json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}),
            "",
            json.dumps({"translation": {"de": "Tschüss", "en": "Bye"}}),
        ],
    )
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, path, 2, "empty line")


def test_empty_text_in_json_names_the_field(tmp_path):
    path = write_lines(
        tmp_path / "p.json",
        [
            json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}),
            json.dumps({"translation": {"de": "  ", "en": "Bye"}}),
        ],
    )
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, path, 2, "'translation.de'", "empty")


def test_invalid_utf8_in_aligned_text(aligned):
    de, en = aligned
    en.write_bytes(b"Good morning.\nHow are you?\nFine, \xff\xfe thanks.\n")
    with pytest.raises(IngestError) as exc:
        read_aligned_text(de, en, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, en, 3, "invalid UTF-8", "byte 6")


def test_invalid_utf8_in_json_lines(tmp_path):
    good = json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}).encode()
    path = tmp_path / "p.json"
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"translation": {"de": "\xc3", "en": "x"}}\n')
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, path, 3, "invalid UTF-8")


def test_unknown_language_code_in_the_pair(tmp_path, aligned):
    de, en = aligned
    with pytest.raises(IngestError) as exc:
        read_aligned_text(de, en, "de-xx", ["de-xx"], "train")
    assert_ingest_error(exc, de, 0, "unknown language code 'xx'")

    path = write_lines(tmp_path / "p.json", [json.dumps({"translation": {"qq": "a", "en": "b"}})])
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "qq-en", ["qq-en"], "train")
    assert_ingest_error(exc, path, 0, "unknown language code 'qq'")


def test_unknown_language_code_in_a_direction(aligned):
    de, en = aligned
    with pytest.raises(IngestError) as exc:
        read_aligned_text(de, en, "de-en", ["de-xx"], "train")
    assert_ingest_error(exc, de, 0, "unknown language code 'xx'")


def test_direction_outside_the_pair(aligned):
    de, en = aligned
    with pytest.raises(IngestError) as exc:
        read_aligned_text(de, en, "de-en", ["de-en", "de-fr"], "train")
    assert_ingest_error(exc, de, 0, "'de-fr'", "'de-en'")


def test_malformed_json_line(tmp_path):
    path = write_lines(
        tmp_path / "p.json",
        [
            json.dumps({"translation": {"de": "Hallo", "en": "Hello"}}),
            json.dumps({"translation": {"de": "Eins", "en": "One"}}),
            '{"translation": {"de": "Zwei", "en": "Two"}',  # closing brace missing
            json.dumps({"translation": {"de": "Drei", "en": "Three"}}),
        ],
    )
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, path, 3, "invalid JSON")


@pytest.mark.parametrize(("blank_lines", "error_line"), [(0, 8), (2, 10)])
def test_malformed_json_list_names_the_line_of_the_error(tmp_path, blank_lines, error_line):
    items = [{"translation": {"de": f"Satz {i}", "en": f"Sentence {i}"}} for i in range(3)]
    lines = json.dumps(items, indent=2).splitlines()
    assert lines[6].strip() == "},"  # the first item's closing brace ...
    lines[6] = lines[6].replace("}", "")  # ... is dropped: the error surfaces on the next line, line 8
    # Blank lines before the list move the error down by as many lines.
    path = write_lines(tmp_path / "list.json", [""] * blank_lines + lines)
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en"], "valid")
    assert_ingest_error(exc, path, error_line, "invalid JSON")


@pytest.mark.parametrize("missing", ["de", "en"])
def test_missing_translation_field(tmp_path, missing):
    third = {"de": "Drei", "en": "Three"}
    del third[missing]
    path = write_lines(
        tmp_path / "p.json",
        [
            json.dumps({"translation": {"de": "Eins", "en": "One"}}),
            json.dumps({"translation": {"de": "Zwei", "en": "Two"}}),
            json.dumps({"translation": third}),
        ],
    )
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en", "en-de"], "train")
    assert_ingest_error(exc, path, 3, f"'translation.{missing}'", "missing")


@pytest.mark.parametrize("item", [{"de": "x", "en": "y"}, {"translation": "de: x"}, ["translation"]])
def test_missing_translation_object(tmp_path, item):
    path = write_lines(
        tmp_path / "p.json", [json.dumps({"translation": {"de": "a", "en": "b"}}), json.dumps(item)]
    )
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, path, 2, "'translation'")


def test_non_string_text_names_field_and_type(tmp_path):
    path = write_lines(tmp_path / "p.json", [json.dumps({"translation": {"de": "a", "en": 42}})])
    with pytest.raises(IngestError) as exc:
        read_alma_json(path, "de-en", ["de-en"], "train")
    assert_ingest_error(exc, path, 1, "'translation.en'", "int")


# --------------------------------------------------------------------------------------------- positives


@needs_shared_data(CSEN_JSONL)
def test_alma_json_lines_both_directions(tmp_path):
    lines = head_lines(CSEN_JSONL, 5)
    path = write_lines(tmp_path / "train.cs-en.json", lines)
    expected_pairs = [
        (json.loads(line)["translation"]["cs"], json.loads(line)["translation"]["en"]) for line in lines
    ]

    rows = read_alma_json(path, "cs-en", ["cs-en", "en-cs"], "train", origin="hw-cs")

    assert len(rows) == 10
    assert len({r["id"] for r in rows}) == 10
    assert {r["origin"] for r in rows} == {"hw-cs"}
    assert {r["split"] for r in rows} == {"train"}
    cs_en = [r for r in rows if r["lp"] == "cs-en"]
    en_cs = [r for r in rows if r["lp"] == "en-cs"]
    assert all(r["src_lang"] == "cs" and r["tgt_lang"] == "en" for r in cs_en)
    assert all(r["src_lang"] == "en" and r["tgt_lang"] == "cs" for r in en_cs)
    assert [(r["src"], r["ref"]) for r in cs_en] == expected_pairs
    assert [(r["ref"], r["src"]) for r in en_cs] == expected_pairs
    # the rows are valid segments
    assert set(rows[0]) == set(SEGMENTS.names)


@needs_shared_data(DEEN_JSON_LIST)
def test_alma_json_list_both_directions(tmp_path):
    items = json.loads(DEEN_JSON_LIST.read_text(encoding="utf-8"))[:4]
    path = tmp_path / "valid.de-en.json"
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    expected_pairs = [(it["translation"]["de"], it["translation"]["en"]) for it in items]

    rows = read_alma_json(path, "de-en", ["de-en", "en-de"], "valid")

    assert len(rows) == 8
    assert len({r["id"] for r in rows}) == 8
    assert {r["split"] for r in rows} == {"valid"}
    assert {r["origin"] for r in rows} == {"valid.de-en.json"}  # default origin: the file name
    assert [(r["src"], r["ref"]) for r in rows if r["lp"] == "de-en"] == expected_pairs
    assert [(r["ref"], r["src"]) for r in rows if r["lp"] == "en-de"] == expected_pairs


@needs_shared_data(DEEN_JSON_LIST)
def test_alma_json_list_pretty_printed_and_one_direction(tmp_path):
    items = json.loads(DEEN_JSON_LIST.read_text(encoding="utf-8"))[:3]
    path = tmp_path / "valid.de-en.json"
    path.write_text(json.dumps(items, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    rows = read_alma_json(path, "de-en", ["en-de"], "valid")
    assert [r["lp"] for r in rows] == ["en-de"] * 3
    assert [r["src"] for r in rows] == [it["translation"]["en"] for it in items]


@needs_shared_data(CSEN_JSONL, DEEN_JSON_LIST)
def test_max_segments_reads_only_the_first_items(tmp_path):
    lines = head_lines(CSEN_JSONL, 6)
    jsonl = write_lines(tmp_path / "train.cs-en.json", lines)
    rows = read_alma_json(jsonl, "cs-en", ["cs-en", "en-cs"], "train", max_items=2)
    assert len(rows) == 4
    assert {r["src"] for r in rows if r["lp"] == "cs-en"} == {
        json.loads(x)["translation"]["cs"] for x in lines[:2]
    }

    items = json.loads(DEEN_JSON_LIST.read_text(encoding="utf-8"))[:5]
    listed = tmp_path / "valid.de-en.json"
    listed.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    rows = read_alma_json(listed, "de-en", ["de-en"], "valid", max_items=3)
    assert [r["src"] for r in rows] == [it["translation"]["de"] for it in items[:3]]


@needs_shared_data(DEEN_DE, DEEN_EN)
def test_aligned_text_real_slice_both_directions_and_max_segments(tmp_path):
    de = write_lines(tmp_path / "train.de-en.de", head_lines(DEEN_DE, 6))
    en = write_lines(tmp_path / "train.de-en.en", head_lines(DEEN_EN, 6))
    rows = read_aligned_text(de, en, "de-en", ["de-en", "en-de"], "train", origin="hw-de")
    assert len(rows) == 12
    assert len({r["id"] for r in rows}) == 12
    expected = list(zip(head_lines(DEEN_DE, 6), head_lines(DEEN_EN, 6), strict=True))
    assert [(r["src"], r["ref"]) for r in rows if r["lp"] == "de-en"] == expected
    assert [(r["ref"], r["src"]) for r in rows if r["lp"] == "en-de"] == expected

    capped = read_aligned_text(de, en, "de-en", ["de-en", "en-de"], "train", origin="hw-de", max_lines=2)
    assert len(capped) == 4
    assert [(r["src"], r["ref"]) for r in capped if r["lp"] == "de-en"] == expected[:2]


# ---------------------------------------------------------------------------------- the ingest stage


def ingest_config(tmp_path: Path, sources: list[dict]):
    from alma_r.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump({"run": {"name": "t", "root": str(tmp_path / "runs")}, "ingest": {"sources": sources}})
    )
    return load_config(path)


def aligned_source(name: str, de: Path, en: Path, **kw) -> dict:
    return {
        "name": name,
        "kind": "aligned_text",
        "pair": "de-en",
        "files": {"de": str(de), "en": str(en)},
        "directions": ["de-en", "en-de"],
        "split": "train",
        **kw,
    }


def test_ingest_stage_writes_segments(tmp_path, aligned):
    from alma_r.tasks.ingest import ingest_task

    de, en = aligned
    items = [{"translation": {"de": "Hallo", "en": "Hello"}}, {"translation": {"de": "Tschüss", "en": "Bye"}}]
    js = write_lines(tmp_path / "v.json", [json.dumps(i, ensure_ascii=False) for i in items])
    cfg = ingest_config(
        tmp_path,
        [
            aligned_source("hw", de, en),
            {
                "name": "val",
                "kind": "alma_json",
                "pair": "de-en",
                "path": str(js),
                "directions": ["de-en"],
                "split": "valid",
            },
        ],
    )
    run_dir = tmp_path / "run"
    result = ingest_task.fn(cfg, run_dir)
    out = run_dir / "ingest" / "segments.parquet"
    assert result.path("segments") == out
    rows = read_rows(out, SEGMENTS)
    assert len(rows) == 3 * 2 + 2
    assert len({r["id"] for r in rows}) == len(rows)
    assert result.counts["segments"] == 8
    assert result.counts["train/de-en"] == 3 and result.counts["train/en-de"] == 3
    assert result.counts["valid/de-en"] == 2
    assert [r["src"] for r in rows if r["origin"] == "val"] == ["Hallo", "Tschüss"]


def test_ingest_stage_error_leaves_no_output(tmp_path, aligned):
    from alma_r.tasks.ingest import ingest_task

    de, en = aligned
    en.write_bytes(b"Good morning.\n\xff\nFine, thanks.\n")
    cfg = ingest_config(tmp_path, [aligned_source("hw", de, en)])
    run_dir = tmp_path / "run"
    with pytest.raises(IngestError) as exc:
        ingest_task.fn(cfg, run_dir)
    assert_ingest_error(exc, en, 2, "invalid UTF-8")
    stage_dir = run_dir / "ingest"
    assert not stage_dir.exists() or not (stage_dir / "segments.parquet").exists()
    assert not stage_dir.exists() or not list(stage_dir.iterdir())


def test_ingest_stage_error_after_a_good_run_removes_the_stale_output(tmp_path, aligned):
    from alma_r.tasks.ingest import ingest_task

    de, en = aligned
    cfg = ingest_config(tmp_path, [aligned_source("hw", de, en)])
    run_dir = tmp_path / "run"
    ingest_task.fn(cfg, run_dir)
    assert (run_dir / "ingest" / "segments.parquet").is_file()

    write_lines(de, ["Guten Morgen.", "Wie geht es dir?"])  # now one line short
    with pytest.raises(IngestError) as exc:
        ingest_task.fn(cfg, run_dir)
    assert_ingest_error(exc, de, 3, "misaligned")
    assert not (run_dir / "ingest" / "segments.parquet").exists()
    assert not (run_dir / "ingest" / "_COMPLETE.json").exists()


def test_ingest_missing_file_names_it(tmp_path, aligned):
    from alma_r.tasks.ingest import ingest_task

    de, _ = aligned
    ghost = tmp_path / "ghost.en"
    cfg = ingest_config(tmp_path, [aligned_source("hw", de, ghost)])
    with pytest.raises(IngestError) as exc:
        ingest_task.fn(cfg, tmp_path / "run")
    assert_ingest_error(exc, ghost, 0, "not found")
    assert not (tmp_path / "run" / "ingest" / "segments.parquet").exists()


def test_ingest_duplicate_ids_are_refused(tmp_path, aligned):
    from alma_r.tasks.ingest import run_ingest

    de, en = aligned
    cfg = ingest_config(tmp_path, [aligned_source("same", de, en), aligned_source("same", de, en)])
    with pytest.raises(IngestError, match="duplicate segment id"):
        run_ingest(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "segments.parquet").exists()


@needs_shared_data(DEEN_JSON_LIST)
@pytest.mark.parametrize(
    "change, problem",
    [
        (None, None),
        ({"en": "   "}, "field 'translation.en' is an empty line"),
        ({"de": None}, "field 'translation.de' is NoneType, expected a string"),
    ],
)
def test_an_hf_dataset_reads_almas_rows_as_alma_json_does(tmp_path, change, problem):
    """The same ALMA items as a JSON lines file and as a dataset folder (Parquet, one `translation` struct):
    the same segments, and the same problem after each one's own `<where>:<row>:` prefix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alma_r.tasks.ingest import run_ingest

    items = json.loads(DEEN_JSON_LIST.read_text(encoding="utf-8"))[:3]
    if change:
        items[1]["translation"].update(change)
    js = write_lines(tmp_path / "hw.json", [json.dumps(i, ensure_ascii=False) for i in items])
    folder = tmp_path / "hw-dataset"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(items), folder / "train.parquet")
    common = {"name": "hw", "pair": "de-en", "directions": ["de-en", "en-de"], "split": "train"}
    as_json = ingest_config(tmp_path, [{**common, "kind": "alma_json", "path": str(js)}])
    as_dataset = ingest_config(tmp_path, [{**common, "kind": "hf_dataset", "dataset": str(folder)}])
    if problem is None:
        json_out, _ = run_ingest(as_json, tmp_path / "json")
        dataset_out, _ = run_ingest(as_dataset, tmp_path / "dataset")
        assert read_rows(dataset_out["segments"], SEGMENTS) == read_rows(json_out["segments"], SEGMENTS)
        return
    with pytest.raises(IngestError) as from_json:
        run_ingest(as_json, tmp_path / "json")
    with pytest.raises(IngestError) as from_dataset:
        run_ingest(as_dataset, tmp_path / "dataset")
    assert_ingest_error(from_json, js, 2, problem)
    assert_ingest_error(from_dataset, f"{folder}:default:train", 2, problem)
    assert str(from_dataset.value).split(": ", 1)[1] == str(from_json.value).split(": ", 1)[1]
