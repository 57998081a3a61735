"""Stage 1, ingest: parallel data and test sets -> segments.parquet; an hf_dataset source that carries other
systems' translations, published scores or human preference labels adds ingested_translations.parquet,
published_scores.parquet and human_preferences.parquet beside it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from alma_r.config import RunConfig, SourceConfig, config_base_dir, resolve_path
from alma_r.data.hub_datasets import DatasetRows, DatasetSplit, read_dataset_split, resolve_split
from alma_r.data.io import write_table
from alma_r.data.readers import IngestError, read_aligned_text, read_alma_json, read_sacrebleu_test_set
from alma_r.data.schemas import HUMAN_PREFERENCES, INGESTED_TRANSLATIONS, PUBLISHED_SCORES, SEGMENTS
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key

# The tables beside segments.parquet: output name (= file stem) -> schema, and the DatasetRows field filling it.
EXTRA_TABLES = {
    "ingested_translations": (INGESTED_TRANSLATIONS, "translations"),
    "published_scores": (PUBLISHED_SCORES, "scores"),
    "human_preferences": (HUMAN_PREFERENCES, "preferences"),
}


def source_files(source: SourceConfig, base_dir: Path) -> list[Path]:
    """The local files a source names (an hf_dataset's files are known only once resolved: dataset_split)."""
    if source.kind == "alma_json":
        return [resolve_path(source.path, base_dir)]
    if source.kind == "aligned_text":
        return [resolve_path(source.files[lang], base_dir) for lang in source.pair.split("-")]
    return []


def max_segments(cfg: RunConfig, source: SourceConfig) -> int | None:
    """The source's own limit or the run-wide one, whichever is smaller."""
    limits = [n for n in (source.max_segments, cfg.ingest.max_segments_per_source) if n is not None]
    return min(limits) if limits else None


def dataset_split(source: SourceConfig, base_dir: Path) -> DatasetSplit:
    """An hf_dataset source resolved: the snapshot (downloaded unless offline or cached) and its split's files."""
    return resolve_split(
        source.dataset_location(base_dir),
        source.dataset_config,
        source.hf_split or source.split,
        source.revision,
    )


def read_dataset_source(cfg: RunConfig, source: SourceConfig, resolved: DatasetSplit) -> DatasetRows:
    return read_dataset_split(
        resolved,
        source.pair,
        source.directions,
        source.split,
        source.name,
        translation_field=source.translation_field,
        columns=source.columns,
        systems=source.systems,
        published_scores=source.published_scores,
        preference_field=source.preference_field,
        direction_field=source.direction_field,
        max_rows=max_segments(cfg, source),
    )


def read_source(cfg: RunConfig, source: SourceConfig, base_dir: Path) -> list[dict]:
    """Segment rows of a file or sacrebleu source."""
    limit = max_segments(cfg, source)
    if source.kind == "alma_json":
        return read_alma_json(
            resolve_path(source.path, base_dir),
            source.pair,
            source.directions,
            source.split,
            origin=source.name,
            max_items=limit,
        )
    if source.kind == "aligned_text":
        a, b = source_files(source, base_dir)
        return read_aligned_text(
            a, b, source.pair, source.directions, source.split, origin=source.name, max_lines=limit
        )
    rows = []
    for lp in source.directions:
        rows += read_sacrebleu_test_set(source.test_set, lp, origin=source.name, max_lines=limit)
    return rows


def run_ingest(cfg: RunConfig, out_dir: Path) -> tuple[dict, dict]:
    if not cfg.ingest.sources:
        raise IngestError("<config>:0: ingest.sources is empty: nothing to read")
    base_dir = config_base_dir(cfg)
    everything = DatasetRows()
    resolved: list[dict] = []
    for source in cfg.ingest.sources:
        if source.kind == "hf_dataset":
            split = dataset_split(source, base_dir)
            if split.snapshot.record() not in resolved:  # one record per snapshot, however many configs
                resolved.append(split.snapshot.record())
            rows = read_dataset_source(cfg, source, split)
            for name in ("segments", "translations", "scores", "preferences"):
                getattr(everything, name).extend(getattr(rows, name))
            continue
        for path in source_files(source, base_dir):
            if not path.is_file():
                raise IngestError(f"{path}:0: file not found (source '{source.name}')")
        everything.segments.extend(read_source(cfg, source, base_dir))
    seen: set[str] = set()
    for row in everything.segments:
        if row["id"] in seen:
            raise IngestError(
                f"{row['origin']}:0: duplicate segment id '{row['id']}': give each source a unique name"
            )
        seen.add(row["id"])
    outputs = {"segments": write_table(everything.segments, out_dir / "segments.parquet", SEGMENTS)}
    by_split = Counter(f"{r['split']}/{r['lp']}" for r in everything.segments)
    counts: dict = {"segments": len(everything.segments), **dict(sorted(by_split.items()))}
    for name, (schema, attr) in EXTRA_TABLES.items():
        rows = getattr(everything, attr)
        if rows:  # only a source that carries them writes the table: its absence says "none"
            outputs[name] = write_table(rows, out_dir / f"{name}.parquet", schema)
            counts[name] = len(rows)
    if resolved:
        counts["resolved"] = resolved  # the Hub items this stage resolved, for run.json
    return outputs, counts


def ingest_files(cfg: RunConfig) -> list[Path]:
    """Every input file whose content the segments depend on: the local files, and the data files (+ README.md)
    of each resolved hf_dataset split, so that new data under the same name or revision gives a new key."""
    base_dir = config_base_dir(cfg)
    files = [p for s in cfg.ingest.sources for p in source_files(s, base_dir) if p.is_file()]
    for source in cfg.ingest.sources:
        if source.kind == "hf_dataset":
            files += dataset_split(source, base_dir).data_files
    return files


def ingest_key(cfg: RunConfig, run_dir: Path) -> StageKey:
    key = stage_key("ingest", cfg.section_hash("ingest"), files=ingest_files(cfg), module=__name__)
    return StageKey("ingest", Path(run_dir) / "ingest", key)


def ingest_stage(cfg: RunConfig, run_dir: Path) -> StageResult:
    """Read every configured source into one segments table (and the tables an hf_dataset carries)."""
    return run_stage(ingest_key(cfg, run_dir), lambda out: run_ingest(cfg, out))


ingest_task = stage_task(ingest_stage, ingest_key)
