"""Stage 5, train: CPO on a LoRA adapter -> adapter/ (PEFT folder), metrics.jsonl, curves.png."""

from __future__ import annotations

from pathlib import Path

from alma_r.config import RunConfig
from alma_r.data.io import read_rows
from alma_r.data.schemas import PAIRS
from alma_r.models.train.metrics import plot_curves, read_metrics
from alma_r.models.train.recipe import CPORecipe
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, code_version, run_stage, stage_key
from alma_r.tasks.shared.training import run_wide_settings, summary_counts


def run_train(
    cfg: RunConfig, pairs_path: Path, model_path: str, adapter: str | None, out_dir: Path
) -> tuple[dict, dict]:
    pairs = read_rows(pairs_path, PAIRS)
    # cfg.train is the recipe's TrainSettings. Continuing an adapter (ALMA-R continues ALMA-13B-Pretrain-LoRA)
    # trains that adapter; else a new LoRA, or every weight with finetune: full.
    recipe = CPORecipe(
        cfg.train,
        model_path,
        pairs,
        out_dir,
        adapter=adapter,
        start_over_hint="rerun with `--force train` to set the checkpoints aside and start over",
        code_version=f"train stage code {code_version(__name__)}",
        **run_wide_settings(cfg),
    )
    recipe.setup().train()
    # A LoRA run yields an adapter for the policy's base model; a full fine-tune yields a whole model.
    kind = "adapter" if recipe.is_peft else "model"
    outputs = {
        kind: recipe.save(out_dir / kind),
        "metrics": out_dir / "metrics.jsonl",
        "summary": out_dir / "train_summary.json",
    }
    if (out_dir / "merged").is_dir():
        outputs["merged"] = out_dir / "merged"
    curves = plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", f"CPO ({cfg.train.loss_type})")
    if curves:
        outputs["curves"] = curves
    counts = summary_counts(
        recipe.summary(), "pairs_used", "steps", "resumed_from", "resumed_checkpoint_written_by"
    )
    return outputs, counts | {"code_version": f"train stage code {code_version(__name__)}"}


def train_key(cfg: RunConfig, run_dir: Path, pairs: StageResult, policy: StageResult) -> StageKey:
    key = stage_key(
        "train", cfg.section_hash("train", "model"), [pairs, policy], extra=cfg.run.seed, module=__name__
    )
    return StageKey("train", Path(run_dir) / "train", key)


def train_stage(cfg: RunConfig, run_dir: Path, pairs: StageResult, policy: StageResult) -> StageResult:
    """CPO-train the policy on the selected pairs (resumes from the last checkpoint)."""
    return run_stage(
        train_key(cfg, run_dir, pairs, policy),
        lambda out: run_train(
            cfg, pairs.path("pairs"), policy.outputs["model"], policy.outputs.get("adapter"), out
        ),
        resumable=True,
    )


def publish_metrics(cfg: RunConfig, result: StageResult) -> None:
    """The per-step metrics as a Prefect table artifact, so that the UI shows the training run."""
    try:
        from prefect.artifacts import create_table_artifact

        rows = read_metrics(result.path("metrics"))
        create_table_artifact(
            table=rows, key="alma-r-train-metrics", description="CPO training metrics per step"
        )
    except Exception as err:  # the metrics file on disk is what matters; the UI copy is a convenience
        print(f"[train] could not publish the metrics artifact: {err}")


train_task = stage_task(train_stage, train_key, gpu=True, publish=publish_metrics)
