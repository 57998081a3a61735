"""The prepare_model stage of both flows: the base model a run starts from, either a tiny LLaMA whose tokenizer
learns the run's training text (model.base: tiny, the CPU default that needs no download) or model.base handed
through as it is (a hub id or a local folder).

Each flow's tasks/<flow>/prepare_model.py says which text is the training text; the rule for the model and its
stage key is this one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alma_r.models.tiny import build_tiny_model
from alma_r.tasks.runtime.stage import StageKey, StageResult, stage_key


def prepare_base_model(cfg, training_texts: Callable[[], list[str]], out_dir: Path) -> tuple[dict, dict]:
    """The tiny model built from `training_texts()` (read only when one is built), or model.base as it is.
    `cfg` is either flow's config: both have the same `model` and `run` sections."""
    if cfg.model.base != "tiny":
        return {"model": cfg.model.base}, {"built": False}
    texts = training_texts()
    path = build_tiny_model(texts, out_dir / "model", **cfg.model.tiny.model_dump(), seed=cfg.run.seed)
    return {"model": path}, {"built": True, "tokenizer_texts": len(texts)}


def prepare_model_key(cfg, run_dir: Path, texts_from: StageResult, module: str) -> StageKey:
    """The stage reads the stage `texts_from` wrote only to build a tiny model: a hub id or folder handed
    through does not change with it. `module` is the calling stage module (its code enters the key)."""
    upstream = [texts_from] if cfg.model.base == "tiny" else []
    key = stage_key("prepare_model", cfg.section_hash("model"), upstream, extra=cfg.run.seed, module=module)
    return StageKey("prepare_model", Path(run_dir) / "prepare_model", key)
