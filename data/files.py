"""Atomic writes of files and folders: a reader never sees a partial file or half a folder, whenever the process
dies. No Parquet here (data/io.py), so that processes that write no table (the trainers) never import pyarrow."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Where replaced outputs go instead of being deleted (a stage's outputs of an earlier key, a restarted trainer's
# checkpoints): beside the folder they came from, until `alma-r prune-cache` removes them.
SUPERSEDED = ".superseded"


def atomic_path(path: Path):
    """A temp path in the same folder as `path` (so that os.replace is atomic); the caller renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_bytes_atomic(path: Path, payload: bytes) -> Path:
    path = Path(path)
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_figure_atomic(fig, path: Path, dpi: int = 90) -> Path:
    """A matplotlib figure as PNG, written under a temporary name and renamed into place, then closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def save_dir_atomic(out_dir: Path, write) -> Path:
    """Write a folder under a temporary name, then rename it into place: readers never see half a folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
