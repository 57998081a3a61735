"""Content digests: of a JSON value (stage keys, section and checkpoint fingerprints) and of a file's bytes (input
files in stage keys, model folders in the generation cache)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def json_sha256(value: Any) -> str:
    """The sha256 of `value` as JSON with sorted keys: the same for equal values, whatever their key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
