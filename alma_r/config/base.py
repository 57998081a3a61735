"""What every config schema shares: the section base class (unknown keys rejected), the error type, the
nearest-key hint, `sample:` paths, and the fingerprint of sections that stage keys use."""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import BaseModel, ConfigDict

import alma_r.data
from alma_r.models.result_fields import Fingerprint, result_dump

SAMPLE_PREFIX = "sample:"
SAMPLE_DIR = Path(alma_r.data.__file__).resolve().parent / "sample"


class ConfigError(ValueError):
    """A configuration problem, with the offending key and value in the message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def nearest_key(key: str, valid: list[str]) -> str:
    """'; did you mean 'x'?' for the valid key closest to `key` (empty when there is none)."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def sections_hash(config: BaseModel, *sections: str) -> Fingerprint:
    """A fingerprint of some sections of a config, for stage keys: a stage reruns when its own settings change,
    and only those that change a result (models/result_fields.py). An unset optional section counts as null.
    Its `parts` are the settings hashed, so that a changed stage key can name the setting that changed."""
    return Fingerprint({s: getattr(config, s) and result_dump(getattr(config, s)) for s in sections})


def resolve_path(value: str, base_dir: Path) -> Path:
    """'sample:x' -> the bundled sample; a relative path -> relative to the config file's folder."""
    if value.startswith(SAMPLE_PREFIX):
        return SAMPLE_DIR / value[len(SAMPLE_PREFIX) :]
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()
