"""What every stage shares: content fingerprints, completion markers, and the run-or-reuse rule.

A stage's key is a hash of its name, its config sections, the project's code version, the keys of the stages
it reads from, and the content of any external file it reads. Its folder holds `_COMPLETE.json` once it has
finished; a later run with the same key and all outputs present reuses it instead of recomputing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alma_r.data.io import write_json_atomic

COMPLETE = "_COMPLETE.json"
IN_PROGRESS = "_IN_PROGRESS.json"


@dataclass
class StageResult:
    stage: str
    key: str
    outputs: dict[str, str]  # output name -> path (or, for pass-through models, a hub id)
    counts: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    def path(self, name: str) -> Path:
        return Path(self.outputs[name])

    def to_json(self) -> dict:
        return asdict(self)


@functools.cache
def code_version() -> str:
    """A hash of every Python source of the package. Conservative: any code edit invalidates every stage
    (a finer, per-stage dependency hash is future work; a stale result is worse than a recomputed one)."""
    import alma_r
    import alma_r.data
    import alma_r.flows
    import alma_r.models
    import alma_r.tasks

    digest = hashlib.sha256()
    for module in (alma_r, alma_r.data, alma_r.flows, alma_r.models, alma_r.tasks):
        for path in sorted(Path(module.__file__).resolve().parent.glob("*.py")):
            digest.update(f"{module.__name__}/{path.name}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_key(
    stage: str,
    config_hash: str,
    upstream: Iterable[StageResult] = (),
    files: Iterable[Path] = (),
    extra: Any = None,
) -> str:
    payload = {
        "stage": stage,
        "config": config_hash,
        "code": code_version(),
        "upstream": sorted(r.key for r in upstream),
        "files": sorted((str(p), file_digest(p)) for p in files),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _reusable(out_dir: Path, key: str) -> dict | None:
    marker = out_dir / COMPLETE
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("key") != key:
        return None
    for value in done.get("outputs", {}).values():
        # Absolute paths are files of the run; anything else is a hub id handed through.
        if Path(value).is_absolute() and not Path(value).exists():
            return None  # an output was deleted: recompute rather than hand on a dead path
    return done


def run_stage(
    stage: str, out_dir: Path, key: str, compute: Callable[[Path], tuple[dict, dict]], resumable: bool = False
) -> StageResult:
    """Reuse the finished stage in `out_dir` if its key matches, else compute it.

    `compute(out_dir) -> (outputs, counts)`. A non-resumable stage starts from an empty folder and leaves none
    behind when it fails; a resumable one (training) keeps partial work made under the same key.
    """
    out_dir = Path(out_dir)
    done = _reusable(out_dir, key)
    if done is not None:
        return StageResult(
            stage, key, done["outputs"], done.get("counts", {}), cached=True, seconds=done.get("seconds", 0.0)
        )
    started = None
    if resumable and (out_dir / IN_PROGRESS).is_file():
        try:
            started = json.loads((out_dir / IN_PROGRESS).read_text()).get("key")
        except (OSError, json.JSONDecodeError):
            started = None
    if out_dir.exists() and started != key:
        shutil.rmtree(out_dir)  # stale outputs of another key must never be mistaken for this run's
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPLETE).unlink(missing_ok=True)
    write_json_atomic(out_dir / IN_PROGRESS, {"key": key})
    t0 = time.perf_counter()
    try:
        outputs, counts = compute(out_dir)
    except BaseException:
        if not resumable:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    seconds = round(time.perf_counter() - t0, 2)
    outputs = {k: str(v) for k, v in outputs.items()}
    write_json_atomic(
        out_dir / COMPLETE, {"key": key, "outputs": outputs, "counts": counts, "seconds": seconds}
    )
    (out_dir / IN_PROGRESS).unlink(missing_ok=True)
    return StageResult(stage, key, outputs, counts, cached=False, seconds=seconds)
