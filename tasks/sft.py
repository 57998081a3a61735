"""Stage 1c (optional), SFT: ALMA's fine-tuning on human-written parallel data before CPO.

On the tiny CPU default it warms the random model up so that its candidates are not noise. It trains all
weights with the CPO engine's `sft` loss (NLL on the reference), so both stages share one trainer.
"""

from __future__ import annotations

from pathlib import Path

from alma_r.config import RunConfig, SftSection
from alma_r.data.io import read_rows
from alma_r.data.schemas import SEGMENTS
from alma_r.models.prompts import make_prompt
from alma_r.models.train.metrics import plot_curves
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.settings import TrainSettings
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.training import run_wide_settings, summary_counts

# The warm-up's settings that the sft section does not expose: NLL on the reference, every weight trained.
SFT_FIXED = {
    "loss_type": "sft",
    "finetune": "full",
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.05,
    "weight_decay": 0.0,
    "logging_steps": 10,
}


def sft_settings(section: SftSection) -> TrainSettings:
    """The sft section as the recipe's settings: the fields it shares with TrainSettings (max_steps, batch_size,
    learning_rate, max_length) pass through by name; a prompt may take all but one of max_length's tokens."""
    shared = section.model_dump(include=set(TrainSettings.model_fields))
    return TrainSettings(
        **shared,
        **SFT_FIXED,
        max_prompt_length=section.max_length - 1,
        save_steps=max(1, section.max_steps // 4),
    )


def run_sft(
    cfg: RunConfig, segments_path: Path, base_model: str, out_dir: Path, adapter: str | None = None
) -> tuple[dict, dict]:
    rows = [r for r in read_rows(segments_path, SEGMENTS) if r["split"] == "train" and r["ref"]]
    pairs = [
        {"prompt": make_prompt(r["src"], r["src_lang"], r["tgt_lang"]), "chosen": r["ref"], "rejected": ""}
        for r in rows
    ]
    recipe = CPORecipe(
        sft_settings(cfg.sft),
        base_model,
        pairs,
        out_dir,
        adapter=adapter,
        start_over_hint="rerun with `--force sft` to set the checkpoints aside and start over",
        **run_wide_settings(cfg),
    )
    model_dir = recipe.setup().train().save(out_dir / "model")
    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", "SFT warm-up")
    counts = summary_counts(recipe.summary(), "pairs", "pairs_used", "steps")
    return {"model": model_dir, "metrics": out_dir / "metrics.jsonl"}, counts


def sft_key(cfg: RunConfig, run_dir: Path, segments: StageResult, base: StageResult) -> StageKey:
    key = stage_key(
        "sft", cfg.section_hash("sft", "model"), [segments, base], extra=cfg.run.seed, module=__name__
    )
    return StageKey("sft", Path(run_dir) / "sft", key)


def sft_stage(cfg: RunConfig, run_dir: Path, segments: StageResult, base: StageResult) -> StageResult:
    """The policy CPO starts from: the SFT model, or the base model (+ adapter) when SFT is off, as prepare_model
    resolved them."""
    where = sft_key(cfg, run_dir, segments, base)
    adapter = base.outputs.get("adapter")
    if not cfg.sft.enabled:
        return run_stage(
            where,
            lambda out: (
                {"model": base.outputs["model"], **({"adapter": adapter} if adapter else {})},
                {"skipped": True},
            ),
        )
    return run_stage(
        where,
        lambda out: run_sft(cfg, segments.path("segments"), base.outputs["model"], out, adapter),
        resumable=True,
    )


sft_task = stage_task(sft_stage, sft_key, gpu=True)
