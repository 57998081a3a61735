"""The ingest stage of the sequence-cpo flow: the Dolly-style file, validated, with each instruction's prompt and
split -> instructions.parquet (INSTRUCTIONS), the file every later stage reads its rows from.

As every stage of the flow: `ingest_key` (where it writes, the content key its outputs are valid for) +
`ingest_stage` (compute or reuse, tasks/runtime/stage.py) + `ingest_task` (the cached Prefect task,
tasks/runtime/prefect_stage.py).
"""

from __future__ import annotations

from pathlib import Path

from alma_r.config import config_base_dir, resolve_path
from alma_r.config.sequence import SequenceRunConfig
from alma_r.data.dolly import ingest_dolly
from alma_r.data.io import read_rows
from alma_r.data.schemas import INSTRUCTIONS
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key


def dolly_path(cfg: SequenceRunConfig) -> Path:
    return resolve_path(cfg.data.path, config_base_dir(cfg))


def run_ingest(cfg: SequenceRunConfig, out_dir: Path) -> tuple[dict, dict]:
    source = dolly_path(cfg)
    path = ingest_dolly(source, out_dir / "instructions.parquet", cfg.data.dolly())
    splits = [r["split"] for r in read_rows(path, INSTRUCTIONS)]
    train, test = splits.count("train"), splits.count("test")
    if not train or not test:
        # Every later stage needs both: MLE and CPO train on one, the evaluation reads the other.
        raise ValueError(
            f"{source}: data.test_fraction={cfg.data.test_fraction} left {train} training and {test} test "
            "instructions; both splits need at least one"
        )
    return {"instructions": path}, {"examples": len(splits), "train": train, "test": test}


def ingest_key(cfg: SequenceRunConfig, run_dir: Path) -> StageKey:
    key = stage_key("ingest", cfg.section_hash("data"), files=[dolly_path(cfg)], module=__name__)
    return StageKey("ingest", Path(run_dir) / "ingest", key)


def ingest_stage(cfg: SequenceRunConfig, run_dir: Path) -> StageResult:
    """The Dolly-style file, validated, with its prompt and split -> instructions.parquet."""
    return run_stage(ingest_key(cfg, run_dir), lambda out: run_ingest(cfg, out))


ingest_task = stage_task(ingest_stage, ingest_key)
