"""Stage 1, ingest: parallel data and test sets -> segments.parquet."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from alma_r.config import RunConfig, SourceConfig, config_base_dir, resolve_path
from alma_r.data.io import write_table
from alma_r.data.readers import IngestError, read_aligned_text, read_alma_json, read_sacrebleu_test_set
from alma_r.data.schemas import SEGMENTS
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key


def source_files(source: SourceConfig, base_dir: Path) -> list[Path]:
    if source.kind == "alma_json":
        return [resolve_path(source.path, base_dir)]
    if source.kind == "aligned_text":
        return [resolve_path(source.files[lang], base_dir) for lang in source.pair.split("-")]
    return []


def read_source(source: SourceConfig, base_dir: Path) -> list[dict]:
    if source.kind == "alma_json":
        return read_alma_json(
            resolve_path(source.path, base_dir),
            source.pair,
            source.directions,
            source.split,
            origin=source.name,
            max_items=source.max_segments,
        )
    if source.kind == "aligned_text":
        a, b = source_files(source, base_dir)
        return read_aligned_text(
            a,
            b,
            source.pair,
            source.directions,
            source.split,
            origin=source.name,
            max_lines=source.max_segments,
        )
    rows = []
    for lp in source.directions:
        rows += read_sacrebleu_test_set(
            source.test_set, lp, origin=source.name, max_lines=source.max_segments
        )
    return rows


def run_ingest(cfg: RunConfig, out_dir: Path) -> tuple[dict, dict]:
    if not cfg.ingest.sources:
        raise IngestError("<config>:0: ingest.sources is empty: nothing to read")
    base_dir = config_base_dir(cfg)
    rows: list[dict] = []
    for source in cfg.ingest.sources:
        for path in source_files(source, base_dir):
            if not path.is_file():
                raise IngestError(f"{path}:0: file not found (source '{source.name}')")
        rows += read_source(source, base_dir)
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise IngestError(
                f"{row['origin']}:0: duplicate segment id '{row['id']}': give each source a unique name"
            )
        seen.add(row["id"])
    path = write_table(rows, out_dir / "segments.parquet", SEGMENTS)
    by_split = Counter(f"{r['split']}/{r['lp']}" for r in rows)
    return {"segments": path}, {"segments": len(rows), **dict(sorted(by_split.items()))}


def ingest_key(cfg: RunConfig, run_dir: Path) -> StageKey:
    files = [p for s in cfg.ingest.sources for p in source_files(s, config_base_dir(cfg)) if p.is_file()]
    key = stage_key("ingest", cfg.section_hash("ingest"), files=files, module=__name__)
    return StageKey("ingest", Path(run_dir) / "ingest", key)


def ingest_stage(cfg: RunConfig, run_dir: Path) -> StageResult:
    """Read every configured source into one segments table."""
    return run_stage(ingest_key(cfg, run_dir), lambda out: run_ingest(cfg, out))


ingest_task = stage_task(ingest_stage, ingest_key)
