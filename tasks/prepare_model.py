"""Stage 1b, prepare the base model: build the tiny local model, or hand a hub id / folder through."""

from __future__ import annotations

from pathlib import Path

from alma_r.config import RunConfig
from alma_r.data.io import read_rows
from alma_r.data.schemas import SEGMENTS
from alma_r.models.tiny import build_tiny_model
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key


def run_prepare_model(cfg: RunConfig, segments_path: Path, out_dir: Path) -> tuple[dict, dict]:
    if cfg.model.base != "tiny":
        return {"model": cfg.model.base}, {"built": False}
    segments = [r for r in read_rows(segments_path, SEGMENTS) if r["split"] != "test"]
    # The tokenizer learns from the training text only: test sets must not leak into the vocabulary.
    texts = [r["src"] for r in segments] + [r["ref"] for r in segments if r["ref"]]
    t = cfg.model.tiny
    path = build_tiny_model(
        texts,
        out_dir / "model",
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        seed=cfg.run.seed,
    )
    return {"model": path}, {"built": True, "tokenizer_texts": len(texts)}


def prepare_model_key(cfg: RunConfig, run_dir: Path, segments: StageResult) -> StageKey:
    upstream = [segments] if cfg.model.base == "tiny" else []
    key = stage_key("prepare_model", cfg.section_hash("model"), upstream, extra=cfg.run.seed, module=__name__)
    return StageKey("prepare_model", Path(run_dir) / "prepare_model", key)


def prepare_model_stage(cfg: RunConfig, run_dir: Path, segments: StageResult) -> StageResult:
    """The base model the run starts from."""
    where = prepare_model_key(cfg, run_dir, segments)
    return run_stage(where, lambda out: run_prepare_model(cfg, segments.path("segments"), out))


prepare_model_task = stage_task(prepare_model_stage, prepare_model_key)
