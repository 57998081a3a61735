"""What every stage shares: content fingerprints, completion markers, and the run-or-reuse rule.

A stage's key is a hash of what its result depends on: its name, the settings of its config sections that change
a result (models/result_fields.py: logging, checkpoint cadence, batch sizes of inference, worker counts are left
out), the code of its compute path (the source of its module and of every alma_r module that module imports,
transitively, and of the scripts those run by path; the orchestration around it, COMPUTE_PATH_EXCLUDES, is
not), the keys of the stages it reads from, and the content of any external file it reads. Its folder holds
`_COMPLETE.json` once it has finished; a later run with the same key and all outputs present and readable reuses
it instead of recomputing.

Nothing is deleted because a key changed: the outputs of an earlier key are moved aside, to
`<run>/.superseded/<stage>-<key>/`, with one printed line saying why, and only `alma-r prune-cache` removes
them. A resumable stage (training) that was interrupted keeps its folder when only its code changed: its
checkpoints carry their own result fingerprint, which the trainer checks. The Prefect side of this (cache policy,
subprocesses, UI) is tasks/runtime/prefect_stage.py; this module knows nothing of Prefect.
"""

from __future__ import annotations

import ast
import datetime as dt
import functools
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alma_r.data.digests import file_sha256, json_sha256
from alma_r.data.files import SUPERSEDED, write_json_atomic
from alma_r.models.result_fields import Fingerprint, flat_settings

COMPLETE = "_COMPLETE.json"
IN_PROGRESS = "_IN_PROGRESS.json"

# Modules around a stage's computation rather than in it: the CLI, the config schemas (their values enter the key,
# their help texts must not), the flows and the stage machinery (Prefect wrapper, child processes, this module),
# the experiments, the progress plumbing and the package's own __init__. Editing them, or upgrading alma-r with
# only such edits, reuses finished stages.
COMPUTE_PATH_EXCLUDES = (
    "alma_r.cli",
    "alma_r.config",
    "alma_r.flows",
    "alma_r.tasks.runtime",
    "alma_r.experiments",
    "alma_r.models.progress",
)


@dataclass
class StageResult:
    stage: str
    key: str
    outputs: dict[str, str]  # output name -> path (or, for pass-through models, a hub id)
    counts: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0
    superseded: list[dict] = field(
        default_factory=list
    )  # earlier outputs this run moved aside: where and why
    resumed: dict | None = None  # a resumable stage continued under other code: {"from_code", "code"}

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


def _alma_r_imports(path: Path, module: str) -> set[str]:
    """Every alma_r module a source file imports, at module level or inside functions, and every module it runs
    by path: `Path(__file__).with_name("worker.py")` (a sibling) or a `"alma_r.x.y"` string (`python -m`)."""
    imported: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("alma_r")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alma_r"):
            imported.add(node.module)
            # `from alma_r.models.score import scorers` names a module, not an attribute
            imported |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "with_name" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.endswith(".py"):
                imported.add(f"{package}.{arg.value[:-3]}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_NAME.fullmatch(node.value)
        ):
            imported.add(node.value)
    return imported


_MODULE_NAME = re.compile(r"alma_r(\.[a-z_][a-z0-9_]*)+")


def in_compute_path(module: str) -> bool:
    return module != "alma_r" and not any(
        module == prefix or module.startswith(prefix + ".") for prefix in COMPUTE_PATH_EXCLUDES
    )


def module_closure(module: str, locate: Callable[[str], Path | None] = _locate) -> dict[str, Path]:
    """The source files `module` runs: itself and every alma_r module of the compute path it imports or runs by
    path, transitively (the orchestration modules, COMPUTE_PATH_EXCLUDES, neither count nor are followed)."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found or (name != module and not in_compute_path(name)):
            continue
        path = locate(name)
        if path is None:  # an attribute imported with `from x import y`, not a module
            continue
        found[name] = path
        todo += sorted(_alma_r_imports(path, name) - found.keys())
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


@dataclass(frozen=True)
class StageKey:
    """Where a stage writes and the fingerprint its outputs are valid for."""

    stage: str
    out_dir: Path
    key: str


class Key(Fingerprint):
    """A stage key: a fingerprint of its `parts` (readable, to say why a key changed) whose `resume_key`, the key
    without the code version, is the one under which an interrupted resumable stage continues."""

    length = 20

    @functools.cached_property
    def resume_key(self) -> str:
        return json_sha256({k: v for k, v in self.parts.items() if k != "code"})[: self.length]


def stage_key(
    stage: str,
    config_hash: str,
    upstream: Iterable[StageResult] = (),
    files: Iterable[Path] = (),
    extra: Any = None,
    module: str = "alma_r.flows.build_alma_r",
) -> Key:
    """`config_hash`: RunConfig.section_hash(...) of the stage's sections; when it carries the settings it hashed
    (a Fingerprint's `parts`), they are kept in the key's parts, so that a changed key can name the setting."""
    return Key(
        {
            "stage": stage,
            "config": config_hash,
            "settings": getattr(config_hash, "parts", None),
            "code": code_version(module),
            "upstream": sorted(r.key for r in upstream),
            "files": sorted((str(p), file_sha256(p)) for p in files),
            "extra": extra,
        }
    )


def why_changed(before: dict, now: dict) -> str:
    """What differs between two keys' parts, in a few words: the first settings that differ (`train.beta 0.1 ->
    0.2`), else the code, the upstream stages, the input files or the seed."""
    if before.get("config") != now.get("config"):
        old, new = flat_settings(before.get("settings") or {}), flat_settings(now.get("settings") or {})
        changed = [
            f"{k} {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)
        ]
        if changed:
            return "settings changed: " + "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
        return "settings changed"
    old_extra, new_extra = before.get("extra"), now.get("extra")
    if isinstance(old_extra, dict) and isinstance(new_extra, dict) and old_extra != new_extra:
        old, new = flat_settings(old_extra), flat_settings(new_extra)
        changed = [
            f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old | new) if old.get(k) != new.get(k)
        ]
        return "changed: " + "; ".join(changed[:3])  # e.g. the commit a Hub revision names (prepare_model)
    for part, words in (
        ("code", "the code of the stage changed"),
        ("upstream", "an earlier stage's outputs changed"),
        ("files", "an input file changed"),
        ("extra", "the seed or the shard changed"),
    ):
        if before.get(part) != now.get(part):
            return words
    return "its key changed"


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


def _marker(out_dir: Path) -> dict | None:
    """The finished or in-progress marker of a stage folder: its key, and its key's parts."""
    for name, state in ((COMPLETE, "complete"), (IN_PROGRESS, "in_progress")):
        try:
            return {**json.loads((out_dir / name).read_text()), "state": state}
        except (OSError, json.JSONDecodeError):
            continue
    return None


def set_aside(out_dir: Path, why: str) -> dict | None:
    """Move a stage folder's outputs to `<parent>/.superseded/<stage>-<key>/` (nothing is deleted), print one
    line saying so and why, and return the record of it (None when there was nothing to move)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    marker = _marker(out_dir) or {}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    label = marker.get("key") or f"unfinished-{stamp}"
    aside = out_dir.parent / SUPERSEDED / f"{out_dir.name}-{label}"
    if aside.exists():
        aside = aside.with_name(f"{aside.name}-{stamp}")
    aside.parent.mkdir(parents=True, exist_ok=True)
    out_dir.rename(aside)
    record = {"stage": out_dir.name, "key": marker.get("key"), "path": str(aside), "why": why, "when": stamp}
    with open(aside.parent / "index.jsonl", "a", encoding="utf-8") as index:
        index.write(json.dumps(record) + "\n")
    print(
        f"[{out_dir.name}] set aside the outputs of key {label} ({why}) in {aside}; `alma-r prune-cache` removes them"
    )
    return record


def force_recompute(out_dir: Path) -> None:
    """Make the next run of a stage recompute it from scratch: its outputs (and a trainer's checkpoints) are set
    aside, not deleted."""
    set_aside(Path(out_dir), "recompute forced (--force)")


def run_stage(
    where: StageKey, compute: Callable[[Path], tuple[dict, dict]], resumable: bool = False
) -> StageResult:
    """Reuse the finished stage in `out_dir` if its key matches, else compute it.

    `compute(out_dir) -> (outputs, counts)`. Outputs of another key are set aside first (set_aside). A
    non-resumable stage starts from an empty folder (what an interrupted run of the same key left is redone
    from scratch; its caches keep the costly part) and leaves none behind when it fails. A resumable one
    (training) keeps the partial work of an interrupted run whose key differs at most in the code version.
    """
    stage, out_dir, key = where.stage, Path(where.out_dir), where.key
    done = _reusable(out_dir, key)
    if done is not None:
        return StageResult(
            stage, key, done["outputs"], done.get("counts", {}), cached=True, seconds=done.get("seconds", 0.0)
        )
    superseded, resumed = [], None
    marker = _marker(out_dir)
    parts = getattr(key, "parts", {})
    if marker is not None and resumable and marker.get("key") == key:
        pass  # the same run, interrupted (or an output of it lost): the stage resumes from its checkpoints
    elif (
        marker is not None
        and marker["state"] == "in_progress"
        and resumable
        and marker.get("resume_key") == getattr(key, "resume_key", None)
    ):
        resumed = {"from_code": (marker.get("parts") or {}).get("code"), "code": parts.get("code")}
        print(
            f"[{stage}] resuming the interrupted run under new code ({resumed['from_code']} -> {resumed['code']})"
        )
    elif marker is not None and marker.get("key") not in (None, key):
        record = set_aside(out_dir, why_changed(marker.get("parts") or {}, parts))
        superseded = [record] if record else []
    elif marker is None and out_dir.is_dir() and any(out_dir.iterdir()):
        record = set_aside(out_dir, "no marker: not written by a finished or interrupted stage")
        superseded = [record] if record else []
    elif out_dir.exists():
        shutil.rmtree(out_dir)  # this key's own unfinished, non-resumable attempt: redone from scratch
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPLETE).unlink(missing_ok=True)
    write_json_atomic(
        out_dir / IN_PROGRESS,
        {"key": key, "resume_key": getattr(key, "resume_key", None), "parts": parts, "resumed": resumed},
    )
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
        out_dir / COMPLETE,
        {
            "key": key,
            "parts": parts,
            "outputs": outputs,
            "counts": counts,
            "seconds": seconds,
            "resumed": resumed,
        },
    )
    (out_dir / IN_PROGRESS).unlink(missing_ok=True)
    return StageResult(
        stage, key, outputs, counts, cached=False, seconds=seconds, superseded=superseded, resumed=resumed
    )
