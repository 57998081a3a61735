"""A run config pinned to commits: after `alma-r download` resolved every Hub revision the config names, the same
config with each revision replaced by its commit (`alma-r download --pin FILE`), so that a run of it reads
exactly these files even after a branch moves."""

from __future__ import annotations

from pathlib import Path

import yaml

from alma_r.config import RunConfig
from alma_r.tasks.shared.prefetch import LOCAL, Item

PINNABLE = ("model", "adapter", "comet", "dataset")


def pinned_config(cfg: RunConfig, items: list[Item]) -> dict:
    """The validated config (every field, defaults included) with each Hub revision replaced by the commit it
    resolved to: a run of it reads exactly these files even after a branch moves. Encoders are not pinned: COMET
    names them inside its checkpoint, and a pinned checkpoint names the same encoder id."""
    data = cfg.model_dump(mode="json")
    for item in items:
        if item.kind not in PINNABLE or not item.commit or item.status == LOCAL:
            continue
        for key in item.used_by:
            if key == "model.base":
                data["model"]["revision"] = item.commit
            elif key == "model.adapter":
                data["model"]["adapter_revision"] = item.commit
            elif key.startswith("score.comet_models."):
                data["score"]["comet_models"][key.removeprefix("score.comet_models.")]["revision"] = (
                    item.commit
                )
            elif key.startswith("ingest.sources["):
                data["ingest"]["sources"][int(key.removeprefix("ingest.sources[").rstrip("]"))][
                    "revision"
                ] = item.commit
    return data


def write_pinned_config(cfg: RunConfig, items: list[Item], path: Path, origin: str) -> Path:
    """pinned_config as YAML at `path` (atomically). Relative paths in it resolve against its own folder, as in
    any config: write it beside the original when the original names files by relative path."""
    from alma_r.data.files import write_text_atomic

    header = (
        f"# {origin} with every Hub revision pinned to the commit `alma-r download` resolved it to.\n"
        "# Every setting is written out, defaults included.\n"
    )
    body = yaml.safe_dump(pinned_config(cfg, items), sort_keys=False, allow_unicode=True)
    return write_text_atomic(Path(path), header + body)
