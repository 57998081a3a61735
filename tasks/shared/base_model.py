"""The prepare_model stage of both flows: the base model a run starts from, either a tiny LLaMA whose tokenizer
learns the run's training text (model.base: tiny, the CPU default that needs no download) or model.base and
model.adapter resolved by the weights policy (models/weights.py): a Hub id to its snapshot at model.revision /
model.adapter_revision (safetensors only; pickle-only weights refused, or with model.allow_pickle_weights converted
once), a local folder handed on as it is (the GPU stage that loads it checks it), unless it needs converting.
The later stages load the folders this stage hands on; its counts list the Hub snapshots (`resolved`).

Each flow's tasks/<flow>/prepare_model.py says which text is the training text; the rule for the model and its
stage key is this one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alma_r.data.hub import HubError, hub_snapshot, is_local
from alma_r.models.tiny import build_tiny_model
from alma_r.models.weights import resolve_weights
from alma_r.tasks.runtime.stage import StageKey, StageResult, stage_key


def prepare_base_model(cfg, training_texts: Callable[[], list[str]], out_dir: Path) -> tuple[dict, dict]:
    """The tiny model built from `training_texts()` (read only when one is built), or the folders of model.base
    and model.adapter. `cfg` is either flow's config: both have the same `model` and `run` sections."""
    model = cfg.model
    if model.base != "tiny":
        base, resolved = resolve_folder(model, model.base, model.revision, "model", "model.revision")
        outputs = {"model": base}
        if model.adapter:
            outputs["adapter"], adapter_resolved = resolve_folder(
                model, model.adapter, model.adapter_revision, "adapter", "model.adapter_revision"
            )
            resolved += adapter_resolved
        return outputs, {"built": False, "resolved": resolved}
    texts = training_texts()
    path = build_tiny_model(texts, out_dir / "model", **cfg.model.tiny.model_dump(), seed=cfg.run.seed)
    return {"model": path}, {"built": True, "tokenizer_texts": len(texts)}


def resolve_folder(
    model, name: str, revision: str | None, kind: str, revision_field: str
) -> tuple[str, list]:
    """The folder `name` is loaded from, and the Hub snapshot records it came from (none for a local folder)."""
    folder = Path(name).expanduser()
    if is_local(name) and not (model.allow_pickle_weights and folder.is_dir()):
        return name, []  # as given: the loader refuses a missing folder or pickle weights in the GPU stage
    snapshot = resolve_weights(
        name,
        revision,
        kind=kind,
        allow_pickle=model.allow_pickle_weights,
        trust_remote_code=model.trust_remote_code,
        revision_field=revision_field,
        allow_field="model.allow_pickle_weights",
    )
    return str(snapshot.path), [snapshot.record()] if snapshot.repo_id else []


def hub_commits(model) -> dict[str, str | None]:
    """The commit each Hub revision of model.base and model.adapter resolves to now (their config file alone is
    fetched to learn it): part of the stage key, so that a branch that moved (`main`, a refs/pr/N) recomputes the
    run from the new commit instead of reusing outputs of the old one. Local folders and the tiny model have
    none. A revision that cannot be resolved keys as None: the stage then fails with the Hub's reason."""
    commits = {}
    for field, name, revision, config_file in (
        ("model.base", model.base, model.revision, "config.json"),
        ("model.adapter", model.adapter, model.adapter_revision, "adapter_config.json"),
    ):
        if name and name != "tiny" and not is_local(name):
            try:
                commits[field] = hub_snapshot(name, revision, allow_patterns=[config_file]).commit
            except HubError:
                commits[field] = None
    return commits


def prepare_model_key(cfg, run_dir: Path, texts_from: StageResult, module: str) -> StageKey:
    """The stage reads the stage `texts_from` wrote only to build a tiny model: a hub id or folder handed
    through does not change with it, but a Hub revision that now names another commit does (hub_commits).
    `module` is the calling stage module (its code enters the key)."""
    upstream = [texts_from] if cfg.model.base == "tiny" else []
    commits = hub_commits(cfg.model)
    extra = {"seed": cfg.run.seed, "hub_commits": commits} if commits else cfg.run.seed
    key = stage_key("prepare_model", cfg.section_hash("model"), upstream, extra=extra, module=module)
    return StageKey("prepare_model", Path(run_dir) / "prepare_model", key)
