"""The train stage of the sequence-cpo flow: sequence-level CPO from the MLE model, the ground truth against K-1
synthetic negatives ("Sequence-level Large Language Model Training with Contrastive Preference Optimization",
anonymous ACL submission, section 4: best-of-K eq. 7, Plackett-Luce eq. 8; negatives of section 4.2).

Resumable as the build-alma-r train stage: killed, it continues from its last checkpoint (train.save_steps).
With `train.finetune: lora` it writes the adapter (`adapter`) and the merged model (`model`, what WiSE-FT
interpolates and evaluation loads)."""

from __future__ import annotations

from pathlib import Path

from alma_r.config import config_base_dir, resolve_path
from alma_r.config.sequence import SequenceRunConfig
from alma_r.models.sequence.negatives import read_autoregressive_samples
from alma_r.models.sequence.settings import SequenceCPOSettings
from alma_r.models.sequence.trainer import SequenceCPORecipe
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, code_version, run_stage, stage_key
from alma_r.tasks.sequence.shared import split_rows
from alma_r.tasks.shared.training import run_wide_settings


def sequence_settings(cfg: SequenceRunConfig) -> SequenceCPOSettings:
    """The train section as it is (its fields are SequenceCPOSettings' hyperparameters), with the negative mix
    and the embedding model's path resolved against the config's folder."""
    t = cfg.train
    embedding = t.embedding_model and str(resolve_path(t.embedding_model, config_base_dir(cfg)))
    return SequenceCPOSettings(
        **t.model_dump(exclude={"embedding_model"}),
        embedding_model=embedding,  # None: the starting (MLE) model's own states
        negatives=cfg.negatives.mix(),
    )


def run_train(
    cfg: SequenceRunConfig, instructions: StageResult, mle: StageResult, samples: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    examples = [
        {"id": r["id"], "prompt": r["prompt"], "target": r["response"]}
        for r in split_rows(instructions, "train")
    ]
    an = None
    if cfg.negatives.autoregressive:
        an = read_autoregressive_samples([Path(p) for p in samples.outputs.values()])
    settings = sequence_settings(cfg)
    recipe = SequenceCPORecipe(
        settings,
        mle.outputs["model"],
        examples,
        out_dir,
        an,
        **run_wide_settings(cfg),
        start_over_hint="rerun with `--force train` to set the checkpoints aside and start over",
        code_version=f"sequence train stage code {code_version(__name__)}",
    )
    recipe.setup().train()
    outputs = {"metrics": out_dir / "metrics.jsonl", "summary": out_dir / "train_summary.json"}
    if settings.finetune == "lora":
        outputs["adapter"] = recipe.save(out_dir / "adapter")
        outputs["model"] = out_dir / "merged"  # CPORecipe.save writes it beside the adapter
    else:
        outputs["model"] = recipe.save(out_dir / "model")
    summary = recipe.summary()
    return outputs, {
        "steps": summary["steps"],
        "examples": summary["examples"],
        "skipped_too_long": summary["skipped_too_long"],
        "sequences_per_example": summary["sequences_per_example"],
        "reference_forward_passes": summary["reference_forward_passes"],
        "resumed_from": summary["resumed_from"],
    }


def train_key(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, mle: StageResult, samples: StageResult
) -> StageKey:
    key = stage_key(
        "train",
        cfg.section_hash("train", "negatives", "model"),
        [instructions, mle, samples],
        extra=cfg.run.seed,
        module=__name__,
    )
    return StageKey("train", Path(run_dir) / "train", key)


def train_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, mle: StageResult, samples: StageResult
) -> StageResult:
    """Sequence-level CPO from the MLE model: the ground truth against K-1 synthetic negatives (eq. 7 / 8)."""
    return run_stage(
        train_key(cfg, run_dir, instructions, mle, samples),
        lambda out: run_train(cfg, instructions, mle, samples, out),
        resumable=True,
    )


train_task = stage_task(train_stage, train_key, gpu=True)
