"""Translations made elsewhere, for the generate stage's `file` and `ingested` systems: another system's files
(one translation per training source of a direction, in file order) and the translations an hf_dataset ingest
source carried. Both are checked against the sources they must cover, with one line naming what is missing."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from alma_r.config import DecodingConfig, RunConfig, config_base_dir, resolve_path
from alma_r.data.readers import IngestError, read_lines


def file_translations(
    cfg: RunConfig, system: DecodingConfig, sources: list[dict], all_segments: list[dict]
) -> list[str]:
    """Another system's translations, one per training source of its direction in file order (checked)."""
    by_lp: dict[str, list[str]] = defaultdict(list)
    for r in all_segments:
        if r["split"] == "train" and r["ref"]:
            by_lp[r["lp"]].append(r["id"])
    text: dict[str, str] = {}
    for lp, file in system.files.items():
        path = resolve_path(file, config_base_dir(cfg))
        lines = read_lines(path)
        if system.file_format == "jsonl":
            values = []
            for i, line in enumerate(lines, start=1):
                try:
                    values.append(json.loads(line)[system.jsonl_field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise IngestError(
                        f"{path}:{i}: no field '{system.jsonl_field}' in a JSON object"
                    ) from None
            lines = values
        ids = by_lp.get(lp, [])
        if len(lines) != len(ids):
            raise IngestError(
                f"{path}:{min(len(lines), len(ids)) + 1}: {len(lines)} translations for the "
                f"{len(ids)} training sources of {lp} (system '{system.name}')"
            )
        text.update(zip(ids, lines, strict=True))
    missing = [r["id"] for r in sources if r["id"] not in text]
    if missing:
        raise IngestError(f"system '{system.name}': no file for the direction of {missing[:3]}")
    return [text[r["id"]] for r in sources]


def carried(rows: list[dict]) -> str:
    """What the ingest sources carry: each system's translations per direction."""
    by_system: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        by_system[r["system"]][r["lp"]] += 1
    return ", ".join(
        f"{name} ({', '.join(f'{lp} {n}' for lp, n in lps.items())})" for name, lps in by_system.items()
    )


def ingested_translations(system: DecodingConfig, sources: list[dict], rows: list[dict]) -> list[dict]:
    """The ingested translation (INGESTED_TRANSLATIONS row) of each source under the system's name, checked:
    every kept source has exactly one."""
    where = f"system '{system.name}' (backend ingested)"
    if not rows:
        raise IngestError(
            f"{where}: the ingest sources carry no translations (an hf_dataset source's `systems` names them)"
        )
    mine: dict[str, dict] = {}
    for r in rows:
        if r["system"] == system.name:
            if r["segment_id"] in mine:
                raise IngestError(f"{where}: two ingested translations of segment {r['segment_id']}")
            mine[r["segment_id"]] = r
    if not mine:
        raise IngestError(
            f"{where}: no ingested translations under this name; the ingest sources carry {carried(rows)}"
        )
    missing = [r["id"] for r in sources if r["id"] not in mine]
    if missing:
        raise IngestError(
            f"{where}: no ingested translation for {len(missing)} of the {len(sources)} sources, e.g. "
            f"{missing[:3]}; the ingest sources carry {carried(rows)}"
        )
    return [mine[r["id"]] for r in sources]
