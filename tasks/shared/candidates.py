"""One system's CANDIDATES table as the generate stages of both flows write it, candidates/<system>.parquet with
its counts, and the candidate tables a later stage finds among a generate stage's outputs."""

from __future__ import annotations

from pathlib import Path

from alma_r.data.io import write_table
from alma_r.data.schemas import CANDIDATES
from alma_r.tasks.runtime.stage import StageResult

PREFIX = "candidates/"  # output names of the candidate tables: candidates/<system>


def write_candidates(
    system: str, rows: list[dict], prompts: int, out_dir: Path, outputs: dict, counts: dict
) -> None:
    """Write candidates/<system>.parquet with `rows` and record it in a generate stage's `outputs` and `counts`:
    the rows, and the prompts (of `prompts`) skipped for being over the prompt limit, which got no row. A stage
    with a generation cache overwrites `<system>/generated` with what it made itself (tasks/generate.py)."""
    outputs[f"{PREFIX}{system}"] = write_table(rows, out_dir / "candidates" / f"{system}.parquet", CANDIDATES)
    counts[f"{system}/generated"] = len(rows)
    counts[f"{system}/skipped_prompt_too_long"] = prompts - len(rows)


def candidate_paths(generated: StageResult) -> list[Path]:
    """The candidate tables among a generate stage's outputs, in the order of their names."""
    return [Path(v) for k, v in sorted(generated.outputs.items()) if k.startswith(PREFIX)]
