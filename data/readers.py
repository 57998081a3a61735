"""Readers that turn parallel data into segment rows. Every input problem stops with one line naming
the file, the line (or item) and the problem; nothing is skipped silently."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from alma_r.data.languages import split_lp


class IngestError(ValueError):
    """Bad input data: the message is '<file>:<line>: <problem>'."""


def read_lines(path: Path) -> list[str]:
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    out = []
    for i, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise IngestError(f"{path}:{i}: invalid UTF-8 at byte {err.start} of the line") from None
        out.append(text.rstrip("\r"))
    return out


def read_json_records(path: Path) -> list[tuple[int, object]]:
    """(where, item) of JSON lines, or of one JSON list (a file whose first non-blank character is '['); where
    is the 1-based line, or for a list the 1-based item index."""
    lines = read_lines(path)
    text = "\n".join(lines)
    if text.lstrip().startswith("["):
        try:
            return [(i, item) for i, item in enumerate(json.loads(text), start=1)]
        except json.JSONDecodeError as err:
            raise IngestError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    items = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            raise IngestError(f"{path}:{i}: empty line where a JSON object was expected")
        try:
            items.append((i, json.loads(line)))
        except json.JSONDecodeError as err:
            raise IngestError(f"{path}:{i}: invalid JSON: {err.msg}") from None
    return items


def read_records(path: Path) -> list[tuple[int, object]]:
    """(where, record) of a Parquet file (by the suffix `.parquet`; where = 1-based row) or of JSON lines / a
    JSON list (read_json_records)."""
    if Path(path).suffix != ".parquet":
        return read_json_records(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise IngestError(f"{path}:0: not a readable Parquet file: {err}") from None
    return list(enumerate(table.to_pylist(), start=1))


def _check_text(path: Path, where: int, field: str, text: object) -> str:
    if not isinstance(text, str):
        raise IngestError(f"{path}:{where}: field '{field}' is {type(text).__name__}, expected a string")
    if not text.strip():
        raise IngestError(f"{path}:{where}: field '{field}' is an empty line")
    return text


def _segments(
    pairs: Iterator[tuple[int, str, str]],
    pair: str,
    directions: list[str],
    origin: str,
    split: str,
    id_prefix: str,
    path: Path,
) -> list[dict]:
    """Emit one segment per (sentence pair, requested direction); `pairs` yields (line, text_a, text_b)
    with text_a in the pair's first language."""
    try:
        a, b = split_lp(pair)
        parsed = [split_lp(lp) for lp in directions]
    except ValueError as err:
        raise IngestError(f"{path}:0: {err}") from None
    for lp, (src, tgt) in zip(directions, parsed, strict=True):
        if {src, tgt} != {a, b}:
            raise IngestError(f"{path}:0: direction '{lp}' is not a direction of the pair '{pair}'")
    rows = []
    for line, text_a, text_b in pairs:
        by_lang = {a: text_a, b: text_b}
        for lp in directions:
            src, tgt = split_lp(lp)
            rows.append(
                {
                    "id": f"{id_prefix}:{lp}:{line}",
                    "lp": lp,
                    "src_lang": src,
                    "tgt_lang": tgt,
                    "src": by_lang[src],
                    "ref": by_lang[tgt],
                    "origin": origin,
                    "split": split,
                }
            )
    return rows


def read_alma_json(
    path: Path,
    pair: str,
    directions: list[str],
    split: str,
    origin: str | None = None,
    max_items: int | None = None,
) -> list[dict]:
    """ALMA's parallel files: JSON lines of `{"translation": {"de": ..., "en": ...}}`, or one JSON list of them."""
    path = Path(path)
    try:
        a, b = split_lp(pair)
    except ValueError as err:
        raise IngestError(f"{path}:0: {err}") from None
    items = read_json_records(path)
    if max_items is not None:
        items = items[:max_items]

    def pairs() -> Iterator[tuple[int, str, str]]:
        for where, item in items:
            translation = item.get("translation") if isinstance(item, dict) else None
            if not isinstance(translation, dict):
                raise IngestError(f"{path}:{where}: field 'translation' is missing or not an object")
            for lang in (a, b):
                if lang not in translation:
                    raise IngestError(
                        f"{path}:{where}: field 'translation.{lang}' is missing (has {sorted(translation)})"
                    )
            yield (
                where,
                _check_text(path, where, f"translation.{a}", translation[a]),
                _check_text(path, where, f"translation.{b}", translation[b]),
            )

    return _segments(pairs(), pair, directions, origin or path.name, split, origin or path.stem, path)


def read_aligned_text(
    path_a: Path,
    path_b: Path,
    pair: str,
    directions: list[str],
    split: str,
    origin: str | None = None,
    max_lines: int | None = None,
) -> list[dict]:
    """Two plain-text files, one segment a line, line i of `path_a` (pair's first language) aligned with
    line i of `path_b`."""
    path_a, path_b = Path(path_a), Path(path_b)
    try:
        a, b = split_lp(pair)
    except ValueError as err:
        raise IngestError(f"{path_a}:0: {err}") from None
    lines_a, lines_b = read_lines(path_a), read_lines(path_b)
    if len(lines_a) != len(lines_b):
        shorter, n = (path_a, len(lines_a)) if len(lines_a) < len(lines_b) else (path_b, len(lines_b))
        raise IngestError(
            f"{shorter}:{n + 1}: misaligned files: {path_a.name} has {len(lines_a)} lines, "
            f"{path_b.name} has {len(lines_b)}"
        )
    if max_lines is not None:
        lines_a, lines_b = lines_a[:max_lines], lines_b[:max_lines]

    def pairs() -> Iterator[tuple[int, str, str]]:
        for i, (text_a, text_b) in enumerate(zip(lines_a, lines_b, strict=True), start=1):
            yield i, _check_text(path_a, i, a, text_a), _check_text(path_b, i, b, text_b)

    return _segments(pairs(), pair, directions, origin or path_a.name, split, origin or path_a.stem, path_a)


def read_sacrebleu_test_set(
    test_set: str, lp: str, origin: str | None = None, max_lines: int | None = None
) -> list[dict]:
    """A WMT test set through sacrebleu's own API (downloads on first use, so it needs the internet once)."""
    from sacrebleu import DATASETS

    src_lang, tgt_lang = split_lp(lp)
    if test_set not in DATASETS:
        raise IngestError(f"sacrebleu:{test_set}:0: unknown test set (see `sacrebleu --list`)")
    dataset = DATASETS[test_set]
    if lp not in dataset.langpairs:
        raise IngestError(f"sacrebleu:{test_set}:0: no direction '{lp}' (has {sorted(dataset.langpairs)})")
    dataset.process_to_text(lp)
    src_path, ref_path = dataset.get_files(lp)[:2]
    srcs, refs = read_lines(Path(src_path)), read_lines(Path(ref_path))
    if max_lines is not None:
        srcs, refs = srcs[:max_lines], refs[:max_lines]
    name = origin or test_set
    return [
        {
            "id": f"{name}:{lp}:{i}",
            "lp": lp,
            "src_lang": src_lang,
            "tgt_lang": tgt_lang,
            "src": _check_text(Path(src_path), i, "src", s),
            "ref": r,
            "origin": name,
            "split": "test",
        }
        for i, (s, r) in enumerate(zip(srcs, refs, strict=True), start=1)
    ]
