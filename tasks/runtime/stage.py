"""What every stage shares: content fingerprints, completion markers, and the run-or-reuse rule.

A stage's key is a hash of its name, its config sections, the code it runs (the source of its module and of every
alma_r module that module imports, transitively), the keys of the stages it reads from, and the content of any
external file it reads. Its folder holds `_COMPLETE.json` once it has finished; a later run with the same key
and all outputs present and readable reuses it instead of recomputing. The Prefect side of this (cache policy,
subprocesses, UI) is tasks/runtime/prefect_stage.py; this module knows nothing of Prefect.
"""

from __future__ import annotations

import ast
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


def _locate(module: str) -> Path | None:
    """The source file of an alma_r module, without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _alma_r_imports(path: Path) -> set[str]:
    """Every alma_r module a source file imports, at module level or inside functions."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("alma_r")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alma_r"):
            imported.add(node.module)
            # `from alma_r.models.score import scorers` names a module, not an attribute
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    return imported


def module_closure(module: str, locate: Callable[[str], Path | None] = _locate) -> dict[str, Path]:
    """The source files `module` runs: itself and every alma_r module it imports, transitively."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = locate(name)
        if path is None:  # an attribute imported with `from x import y`, not a module
            continue
        found[name] = path
        todo += sorted(_alma_r_imports(path) - found.keys())
    return found


def code_version(
    module: str = "alma_r.flows.build_alma_r", locate: Callable[[str], Path | None] = _locate
) -> str:
    """A hash of the source a stage runs. Editing a helper a stage imports invalidates that stage (and, through
    the upstream keys, every stage after it); editing an unrelated module does not."""
    if locate is _locate:
        return _cached_code_version(module)
    return _hash_sources(module_closure(module, locate))


@functools.cache
def _cached_code_version(module: str) -> str:
    return _hash_sources(module_closure(module))


def _hash_sources(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(files[name].read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class StageKey:
    """Where a stage writes and the fingerprint its outputs are valid for."""

    stage: str
    out_dir: Path
    key: str


def stage_key(
    stage: str,
    config_hash: str,
    upstream: Iterable[StageResult] = (),
    files: Iterable[Path] = (),
    extra: Any = None,
    module: str = "alma_r.flows.build_alma_r",
) -> str:
    payload = {
        "stage": stage,
        "config": config_hash,
        "code": code_version(module),
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
        if Path(value).is_absolute() and not _readable(Path(value)):
            return None  # an output was deleted or damaged: recompute rather than hand on a dead path
    return done


def _readable(path: Path) -> bool:
    if not path.exists():
        return False
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)  # the footer: a truncated or overwritten file fails here
        except Exception:
            return False
    return True


def is_complete(where: StageKey) -> bool:
    """Whether `where.out_dir` holds finished, readable outputs for exactly this key."""
    return _reusable(Path(where.out_dir), where.key) is not None


def force_recompute(out_dir: Path) -> None:
    """Make the next run of a stage recompute it (its outputs stay until then)."""
    (Path(out_dir) / COMPLETE).unlink(missing_ok=True)


def run_stage(
    where: StageKey, compute: Callable[[Path], tuple[dict, dict]], resumable: bool = False
) -> StageResult:
    """Reuse the finished stage in `out_dir` if its key matches, else compute it.

    `compute(out_dir) -> (outputs, counts)`. A non-resumable stage starts from an empty folder and leaves none
    behind when it fails; a resumable one (training) keeps partial work made under the same key.
    """
    stage, out_dir, key = where.stage, Path(where.out_dir), where.key
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
