"""What several stages of the sequence-cpo flow share: the instruction rows of a split, the config fingerprint of
a few fields, the CANDIDATES row of a model's output, and MLE training (the mle stage's model and the scorer
stage's P-hat are both next-token prediction on the training split).

Stages import this module, never each other: one stage reads what another wrote through its StageResult.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alma_r.config.sequence import MleSection, SequenceRunConfig
from alma_r.data.io import read_rows
from alma_r.data.schemas import INSTRUCTIONS
from alma_r.models.train.metrics import plot_curves
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.settings import TrainSettings
from alma_r.tasks.runtime.stage import StageResult
from alma_r.tasks.shared.training import run_wide_settings, summary_counts

# CANDIDATES rows need an `lp`; an instruction has no translation direction.
INSTRUCTION_LP = "instruction"


def fields_hash(**fields) -> str:
    """A fingerprint of a few config fields, for a stage that depends on part of a section only."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_rows(instructions: StageResult, split: str) -> list[dict]:
    """The INSTRUCTIONS rows of one split ("train" or "test"), in file order."""
    return [r for r in read_rows(instructions.path("instructions"), INSTRUCTIONS) if r["split"] == split]


def candidate_row(row: dict, system: str, text: str, model_dir: str | Path, generation: str) -> dict:
    """One CANDIDATES row: `system`'s output `text` for the instruction `row`, made by the model in
    `model_dir` with the decoding settings `generation` (JSON)."""
    return {
        "segment_id": row["id"],
        "lp": INSTRUCTION_LP,
        "system": system,
        "hypothesis": text,
        "model_id": str(Path(model_dir).resolve()),
        "adapter": None,
        "generation": generation,
    }


def mle_settings(section: MleSection) -> TrainSettings:
    """Next-token prediction on prompt + response: the CPO engine's `sft` loss (NLL of the chosen side), every
    weight trained. `section` is cfg.mle, or cfg.scorer for the scoring model; the fields it shares with
    TrainSettings pass through as they are (the scorer's model / tiny are not TrainSettings fields)."""
    return TrainSettings(
        **section.model_dump(include=set(TrainSettings.model_fields)), loss_type="sft", finetune="full"
    )


def train_mle(cfg: SequenceRunConfig, section: MleSection, base_model: str, out_dir: Path, title: str, rows):
    """CPORecipe with loss sft on `rows` (INSTRUCTIONS): a pair whose two sides are the response is one MLE
    example. `section` is cfg.mle or cfg.scorer."""
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"]} for r in rows]
    recipe = CPORecipe(mle_settings(section), base_model, pairs, out_dir, **run_wide_settings(cfg))
    model_dir = recipe.setup().train().save(out_dir / "model")
    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", title)
    summary = recipe.summary()
    # An MLE example is a pair of the recipe: its counts by the name the flow uses.
    counts = {"examples": summary["pairs"], "examples_used": summary["pairs_used"]}
    counts |= summary_counts(summary, "steps")
    return {"model": model_dir, "metrics": out_dir / "metrics.jsonl"}, counts
