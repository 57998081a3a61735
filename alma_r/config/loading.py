"""Loading a config: YAML, `--set a.b=value` overrides (values parsed as YAML), validation with one line per
problem naming the key (and the nearest valid key for a typo), and the JSON form a stage request carries."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alma_r.config.base import ConfigError, nearest_key
from alma_r.config.run import RunConfig


def _model_at(loc: tuple, root: type[BaseModel] = RunConfig) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at `loc` (to list its valid keys)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _format_error(err: ValidationError, origin: str, root: type[BaseModel] = RunConfig) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            model = _model_at(loc, root)
            valid = list(model.model_fields) if model else []
            lines.append(f"{origin}: unknown key '{key}'{nearest_key(str(loc[-1]), valid)}")
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"{origin}: '{key}': {e['msg']}{shown}")
    return "\n".join(lines)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """['train.beta=0.2'] -> [('train.beta', 0.2)]; values are parsed as YAML (numbers, lists, booleans)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. train.beta=0.2")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return parsed


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, config_class: type = RunConfig
) -> RunConfig:
    """Load a YAML run config (or the defaults), apply `KEY=VALUE` overrides, validate as `config_class`
    (RunConfig; alma_r/config/sequence.py's SequenceRunConfig for the sequence-cpo flow)."""
    data: dict = {}
    origin = "<defaults>"
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        base_dir = path.resolve().parent
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    try:
        cfg = config_class.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin, config_class)) from None
    cfg._base_dir = base_dir
    return cfg


def config_base_dir(cfg: RunConfig) -> Path:
    return cfg._base_dir


def config_to_json(cfg: RunConfig) -> dict:
    """The validated config with its base folder and class, to hand a stage to another process."""
    kind = f"{type(cfg).__module__}:{type(cfg).__qualname__}"
    return {"config": cfg.model_dump(mode="json"), "base_dir": str(cfg._base_dir), "class": kind}


def config_from_json(data: dict) -> RunConfig:
    module, name = data.get("class", "alma_r.config:RunConfig").split(":")
    if not module.startswith("alma_r."):  # a request names only this project's config classes
        raise ConfigError(f"config class {module}:{name} is not an alma_r config")
    cfg = getattr(importlib.import_module(module), name).model_validate(data["config"])
    cfg._base_dir = Path(data["base_dir"])
    return cfg
