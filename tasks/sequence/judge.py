"""The judge stage of the sequence-cpo flow: the pairwise LLM-judge win rate of each model's greedy outputs against
the ground truth, in both answer orders ("Sequence-level Large Language Model Training with Contrastive
Preference Optimization", anonymous ACL submission, section 5, "Evaluation": every model is compared with the
same ground truth, so that the judge's position bias cancels between models). Nothing when no judge endpoint is
configured.
"""

from __future__ import annotations

from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.data.files import write_json_atomic
from alma_r.data.io import read_rows
from alma_r.data.schemas import CANDIDATES, INSTRUCTIONS
from alma_r.models.evaluate.judge import (
    JudgeConfig,
    judge_against_references,
    write_items_jsonl,
    write_result_json,
)
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.endpoints import endpoint_config


def judge_query(row: dict) -> str:
    """What the judge reads as the query to the chatbot: the instruction, and its context when it has one."""
    return row["instruction"] if not row["context"] else f"{row['instruction']}\n\n{row['context']}"


def run_judge(
    cfg: SequenceRunConfig, instructions: StageResult, evaluated: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    j = cfg.judge
    by_id = {r["id"]: r for r in read_rows(instructions.path("instructions"), INSTRUCTIONS)}
    outputs_by_system: dict[str, list[dict]] = {}
    for row in read_rows(evaluated.path("generations"), CANDIDATES):
        outputs_by_system.setdefault(row["system"], []).append(row)
    endpoint = endpoint_config(j.endpoint)
    judge_cfg = JudgeConfig(
        template=j.template, max_tokens=j.max_tokens, temperature=j.temperature, confidence=j.confidence
    )
    cache = Path(cfg.run.root).resolve() / "_cache" / "requests.sqlite"
    outputs, counts, results = {}, {}, {}
    for system, rows in outputs_by_system.items():
        run = judge_against_references(
            endpoint,
            [judge_query(by_id[r["segment_id"]]) for r in rows],
            [r["hypothesis"] for r in rows],
            [by_id[r["segment_id"]]["response"] for r in rows],
            cache,
            judge_cfg,
        )
        outputs[f"{system}/result"] = write_result_json(run.result, out_dir / f"{system}.json")
        outputs[f"{system}/items"] = write_items_jsonl(run.items, out_dir / f"{system}.items.jsonl")
        results[system] = {
            "win_rate": run.result.win_rate,
            "ci_low": run.result.ci_low,
            "ci_high": run.result.ci_high,
            "decided_items": run.result.decided_items,
            "invalid": run.result.invalid,
            "signature": run.result.signature,
        }
        counts[f"{system}/invalid"] = run.result.invalid
    outputs["win_rates"] = write_json_atomic(out_dir / "win_rates.json", results)
    return outputs, counts


def judge_key(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, evaluated: StageResult
) -> StageKey:
    key = stage_key("judge", cfg.section_hash("judge"), [instructions, evaluated], module=__name__)
    return StageKey("judge", Path(run_dir) / "judge", key)


def judge_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, evaluated: StageResult
) -> StageResult:
    """Win rate of each model's greedy outputs against the ground truth (both answer orders); nothing when no
    judge endpoint is configured."""
    where = judge_key(cfg, run_dir, instructions, evaluated)
    if cfg.judge is None:
        return run_stage(where, lambda out: ({}, {"skipped": True}))
    return run_stage(where, lambda out: run_judge(cfg, instructions, evaluated, out))


judge_task = stage_task(judge_stage, judge_key)
