"""Which settings change a result, declared on the field: `Field(..., json_schema_extra=NOT_A_RESULT)`.

A stage's cache key and a training checkpoint's fingerprint hash `result_dump(settings)`: the settings with every
field marked `affects_result: False` left out (logging and checkpoint cadence, progress, worker counts, batch
sizes of inference, paths of environments), so that changing one of those reuses a finished stage and resumes
an interrupted one instead of starting over. Everything else counts, including fields added later: a field is a
result unless it says otherwise.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from alma_r.data.digests import json_sha256

NOT_A_RESULT = {"affects_result": False}


def affects_result(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_result") is False)


def result_dump(settings: BaseModel) -> dict:
    """`settings.model_dump(mode="json")` without the fields that do not change a result, at any depth
    (nested sections, lists and dicts of them)."""
    return _prune(settings, settings.model_dump(mode="json"))


def _prune(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        return {
            name: _prune(getattr(value, name), dumped[name])
            for name, field in type(value).model_fields.items()
            if affects_result(field) and name in dumped
        }
    if isinstance(value, (list, tuple)):
        return [_prune(v, d) for v, d in zip(value, dumped, strict=True)]
    if isinstance(value, dict):
        return {k: _prune(v, d) for (k, d), v in zip(dumped.items(), value.values(), strict=True)}
    return dumped


def flat_settings(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted names (`lora.r`, `train.beta`), for readable fingerprints and diffs."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Fingerprint(str):
    """The first `length` hex digits of the sha256 of JSON `parts`: a string (what caches and markers compare)
    that keeps its parts, so that a changed fingerprint can say what changed. Pickles with its parts (Prefect's
    cache, stage child processes)."""

    length = 16
    parts: dict

    def __new__(cls, parts: dict):
        fingerprint = super().__new__(cls, json_sha256(parts)[: cls.length])
        fingerprint.parts = parts
        return fingerprint

    def __reduce__(self):
        return (type(self), (self.parts,))


def non_result_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of the fields of `model` (and of its nested sections) that do not change a result."""
    names = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        if not affects_result(field):
            names.append(dotted)
            continue
        for nested in _model_types(field.annotation):
            names += non_result_fields(nested, f"{dotted}.")
    return names


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field's type (X, X | None, list[X], dict[str, X])."""
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in get_args(annotation):
        found += _model_types(arg)
    return found
