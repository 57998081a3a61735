"""Stage 1c (optional), SFT: ALMA's fine-tuning on human-written parallel data before CPO.

On the tiny CPU default it warms the random model up so that its candidates are not noise. It trains all
weights with the CPO engine's `sft` loss (NLL on the reference), so both stages share one trainer.
"""

from __future__ import annotations

from pathlib import Path

from alma_r.config import RunConfig
from alma_r.data.io import read_rows
from alma_r.data.schemas import SEGMENTS
from alma_r.models.prompts import make_prompt
from alma_r.models.train.recipe import CPORecipe, TrainSettings, plot_curves
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key


def run_sft(cfg: RunConfig, segments_path: Path, base_model: str, out_dir: Path) -> tuple[dict, dict]:
    rows = [r for r in read_rows(segments_path, SEGMENTS) if r["split"] == "train" and r["ref"]]
    pairs = [
        {"prompt": make_prompt(r["src"], r["src_lang"], r["tgt_lang"]), "chosen": r["ref"], "rejected": ""}
        for r in rows
    ]
    s = cfg.sft
    settings = TrainSettings(
        loss_type="sft",
        learning_rate=s.learning_rate,
        lr_scheduler="cosine",
        warmup_ratio=0.05,
        weight_decay=0.0,
        max_steps=s.max_steps,
        batch_size=s.batch_size,
        max_prompt_length=s.max_length - 1,
        max_length=s.max_length,
        save_steps=max(1, s.max_steps // 4),
        logging_steps=10,
        seed=cfg.run.seed,
        lora=None,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    recipe = CPORecipe(settings, base_model, pairs, out_dir, adapter=cfg.model.adapter).setup().train()
    model_dir = recipe.save(out_dir / "model")
    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", "SFT warm-up")
    summary = recipe.summary()
    return {"model": model_dir, "metrics": out_dir / "metrics.jsonl"}, {
        "pairs": summary["pairs"],
        "pairs_used": summary["pairs_used"],
        "steps": summary["steps"],
        **{f"skipped_{k}": v for k, v in summary["skipped"].items()},
    }


def sft_key(cfg: RunConfig, run_dir: Path, segments: StageResult, base: StageResult) -> StageKey:
    key = stage_key(
        "sft", cfg.section_hash("sft", "model"), [segments, base], extra=cfg.run.seed, module=__name__
    )
    return StageKey("sft", Path(run_dir) / "sft", key)


def sft_stage(cfg: RunConfig, run_dir: Path, segments: StageResult, base: StageResult) -> StageResult:
    """The policy CPO starts from: the SFT model, or the base model (+ adapter) when SFT is off."""
    where = sft_key(cfg, run_dir, segments, base)
    if not cfg.sft.enabled:
        return run_stage(
            where,
            lambda out: (
                {
                    "model": base.outputs["model"],
                    **({"adapter": cfg.model.adapter} if cfg.model.adapter else {}),
                },
                {"skipped": True},
            ),
        )
    return run_stage(
        where, lambda out: run_sft(cfg, segments.path("segments"), base.outputs["model"], out), resumable=True
    )


sft_task = stage_task(sft_stage, sft_key, gpu=True)
