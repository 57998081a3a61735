"""The weights policy: which folder a model or adapter is loaded from, and what its weights are.

Only safetensors are loaded: a pickle file (`.bin`, `.pt`, `.pth`, `.ckpt`) can run code when it is read. A Hub
repository is resolved at its revision (data/hub.py) with its config, tokenizer and safetensors files only. A
revision that has pickle weights only is refused, in one line that names the files and the two ways on: another
revision (haoranxu/ALMA-13B-Pretrain's refs/pr/4 is its safetensors conversion), or allowing pickle weights. Then
they are read with `torch.load(weights_only=True)` (tensors only, no code) and converted to safetensors once, into
`<HF hub cache>/alma-r-converted/<models--org--name>/<commit>/`; every later load reads that folder.

A model is identified by what it is (`weights_fingerprint`): a Hub snapshot, or its conversion, by repository and
commit, without reading its weights; any other folder by the digest of its files' contents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

from alma_r.data.digests import file_sha256
from alma_r.data.hub import HubError, HubSnapshot, hub_snapshot, is_local, snapshot_of

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# What transformers and PEFT read from a model folder besides the weights (their code only with remote code).
CONFIG_FILES = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
REMOTE_CODE = ["*.py"]
# The pickle files transformers (pytorch_model.bin, its shards) and PEFT (adapter_model.bin) load: others, such
# as training_args.bin or optimizer.pt, are no weights and are neither fetched nor converted.
LOADABLE_PICKLES = ("pytorch_model*.bin", "adapter_model.bin")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONVERTED_DIR = "alma-r-converted"
CONVERTED_RECORD = "alma_r_converted.json"


class ModelNotFoundError(FileNotFoundError):
    """A local model path that does not exist (transformers would take it for a Hub id and say so)."""


class RefusedWeightsError(OSError):
    """A model folder or Hub revision whose weights are pickle files only: loading those can run arbitrary code."""


# ------------------------------------------------------------------------------------------------ resolving
def resolve_weights(
    name: str,
    revision: str | None = None,
    kind: str = "model",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision_field: str = "model.revision",
    allow_field: str = "model.allow_pickle_weights",
) -> HubSnapshot:
    """The folder `name` (a model, or with kind "adapter" a PEFT adapter) is loaded from, with safetensors
    weights: a local folder itself, a Hub repository's cached snapshot at `revision`, or, for pickle-only weights
    when `allow_pickle`, their safetensors conversion (its record keeps the repository, revision and commit).
    `revision_field` and `allow_field` are the settings a refusal names as the ways on."""
    if kind not in ("model", "adapter"):
        raise ValueError(f"kind {kind!r}: a model or an adapter")
    if is_local(name):
        return _resolve_folder(name, kind, allow_pickle, allow_field)
    patterns = [*CONFIG_FILES, "*.safetensors", *(REMOTE_CODE if trust_remote_code else [])]
    snapshot = hub_snapshot(name, revision, allow_patterns=patterns)
    if _has_weights(snapshot.path, kind):
        return snapshot
    target = _converted_folder(snapshot)
    if allow_pickle and (target / CONVERTED_RECORD).is_file():
        return _as_converted(snapshot, target)  # converted before: never redone
    pickled = _loadable_pickles(_repo_files(snapshot))
    shown = f"{kind} {name}@{revision or 'main'} (commit {snapshot.commit})"
    if not pickled:
        where = " in the cached snapshot (HF_HUB_OFFLINE is set: fetch it with `alma-r download`)"
        raise HubError(
            f"{shown}: no weights{where if _offline() else ''}: neither *.safetensors nor pytorch_model*.bin / "
            f"adapter_model.bin; set {revision_field} to a revision that has them"
        )
    if not allow_pickle:
        raise RefusedWeightsError(
            f"{shown}: refused {', '.join(pickled)}: pickle weights can run code when loaded and this revision has "
            f"no safetensors; set {revision_field}: <a revision with safetensors> (a refs/pr/N conversion, say), "
            f"or {allow_field}: true to read them with torch.load(weights_only=True) and convert them to "
            "safetensors once, in the Hub cache"
        )
    # The same commit as the files already fetched, even if the branch moved since.
    full = hub_snapshot(name, snapshot.commit, allow_patterns=[*patterns, *pickled])
    record = {
        "repo_id": name,
        "repo_type": snapshot.repo_type,
        "revision": revision,
        "commit": snapshot.commit,
    }
    convert_folder(full.path, target, pickled, record)
    return _as_converted(snapshot, target)


def _resolve_folder(name: str, kind: str, allow_pickle: bool, allow_field: str) -> HubSnapshot:
    check_model_path(name, weights=False)
    folder = Path(name).expanduser().resolve()
    if not folder.is_dir():
        raise ModelNotFoundError(f"{name}: no such model folder")
    snapshot = HubSnapshot(folder, None, "model", None, None)
    if _has_weights(folder, kind):
        return snapshot
    present = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    pickled = _loadable_pickles(present)
    if not pickled:
        return snapshot  # nothing to convert: the loader says what is missing
    if not allow_pickle:
        raise RefusedWeightsError(folder_refusal(folder, pickled, allow_field))
    # A local folder's conversion is named by its path and its pickle files' sizes and times: a re-saved
    # folder is converted again, an unchanged one never.
    stamp = hashlib.sha256(str(folder).encode())
    for file in pickled:
        stat = (folder / file).stat()
        stamp.update(f"\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    target = _converted_root() / "local" / stamp.hexdigest()[:16]
    record = {"repo_id": None, "repo_type": "model", "revision": None, "commit": None, "source": str(folder)}
    convert_folder(folder, target, pickled, record)
    return HubSnapshot(target, None, "model", None, None)


def check_model_path(model_path: str, weights: bool) -> None:
    """A path written as local (absolute, ./, ../, ~) must be a folder; a folder's weights (when `weights`)
    must include safetensors. Anything else is a Hub id."""
    path = Path(model_path).expanduser()
    if not path.exists() and (path.is_absolute() or model_path.startswith((".", "~"))):
        raise ModelNotFoundError(f"{model_path}: no such model folder")
    if weights and path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise RefusedWeightsError(folder_refusal(path, pickled))


def folder_refusal(folder: Path, pickled: list[str], allow_field: str = "model.allow_pickle_weights") -> str:
    """The one line refusing a local folder whose weights are the pickle files `pickled`."""
    return (
        f"{folder}: refused {', '.join(pickled)}: only safetensors weights are loaded (pickle files can run "
        "code); convert a model you trust with save_pretrained(..., safe_serialization=True), or set "
        f"{allow_field}: true in a run config to read it with torch.load(weights_only=True) and convert it once"
    )


def _has_weights(folder: Path, kind: str) -> bool:
    if kind == "adapter":
        return (folder / ADAPTER_WEIGHTS).is_file()
    return any(folder.glob("*.safetensors"))


def _loadable_pickles(names: list[str]) -> list[str]:
    return sorted(n for n in names if "/" not in n and any(fnmatch(n, p) for p in LOADABLE_PICKLES))


def _offline() -> bool:
    """What huggingface_hub itself obeys (read from HF_HUB_OFFLINE when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_files(snapshot: HubSnapshot) -> list[str]:
    """The repository's files at the snapshot's commit: asked of the Hub, or, offline, those in the cache."""
    from huggingface_hub import HfApi

    if _offline():
        return sorted(p.name for p in snapshot.path.iterdir())
    try:
        return HfApi().list_repo_files(
            snapshot.repo_id, revision=snapshot.commit, repo_type=snapshot.repo_type
        )
    except Exception as err:  # the Hub's errors differ by cause; keep its reason, in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise HubError(f"{snapshot.name}: cannot list its files: {type(err).__name__}: {reason}") from None


def _converted_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / CONVERTED_DIR


def _converted_folder(snapshot: HubSnapshot) -> Path:
    """Beside the Hub's own cache, named like it: one conversion per repository and commit."""
    repo = f"{snapshot.repo_type}s--{snapshot.repo_id.replace('/', '--')}"
    return _converted_root() / repo / snapshot.commit


def _as_converted(snapshot: HubSnapshot, folder: Path) -> HubSnapshot:
    return HubSnapshot(folder, snapshot.repo_id, snapshot.repo_type, snapshot.revision, snapshot.commit)


# ------------------------------------------------------------------------------------------------ converting
def safetensors_name(pickle_name: str) -> str:
    """transformers' names: pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors,
    adapter_model.bin -> adapter_model.safetensors."""
    stem = pickle_name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return f"{stem}.safetensors"


def convert_folder(source: Path, target: Path, pickled: list[str], record: dict) -> Path:
    """`source`'s pickle weight files `pickled` as safetensors in `target`, with its other top-level files
    (config, tokenizer) copied and the shard index rewritten; written under a temporary name and renamed, and
    left as it is when `target` is already complete."""
    import torch
    from safetensors.torch import save_file

    if (target / CONVERTED_RECORD).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        renamed = {name: safetensors_name(name) for name in pickled}
        for file in sorted(source.iterdir()):
            if file.name.startswith(".") or not file.is_file():
                continue
            if file.name in renamed:
                state = torch.load(file, map_location="cpu", weights_only=True)
                save_file(_unshared(state), tmp / renamed[file.name], metadata={"format": "pt"})
            elif file.name == "pytorch_model.bin.index.json":
                index = json.loads(file.read_text(encoding="utf-8"))
                index["weight_map"] = {k: renamed.get(v, v) for k, v in index["weight_map"].items()}
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps(index, indent=2), encoding="utf-8"
                )
            elif not any(fnmatch(file.name, p) for p in PICKLE_WEIGHTS):
                shutil.copyfile(file, tmp / file.name)  # the Hub cache's symlinks, followed
        written = {**record, "source": record.get("source") or str(source), "converted": renamed}
        (tmp / CONVERTED_RECORD).write_text(json.dumps(written, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / CONVERTED_RECORD).is_file():  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unshared(state: dict) -> dict:
    """safetensors stores no two tensors on one storage: a tied weight (lm_head = embed_tokens) is cloned."""
    seen, out = set(), {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return out


# ------------------------------------------------------------------------------------------------ identity
@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and modification time too, so that a process reads each file once while it stays."""
    return file_sha256(Path(path))


def file_digest(path: Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def hub_origin(folder: Path) -> tuple[str, str] | None:
    """(repository id, commit) of a folder inside a Hub cache snapshot or of a conversion of one, else None."""
    found = snapshot_of(folder)
    if found is not None:
        return found[1], found[2]
    record = Path(folder) / CONVERTED_RECORD
    if record.is_file():
        written = json.loads(record.read_text(encoding="utf-8"))
        if written.get("repo_id") and written.get("commit"):
            return written["repo_id"], written["commit"]
    return None


def weights_fingerprint(
    name: str | None, revision: str | None = None, digest: Callable[[Path], str] = file_digest
) -> str | None:
    """What a model or adapter is, for checkpoints and the generation cache: `hub <repo>@<commit>` for a Hub id
    (resolved at `revision`), a folder of a Hub cache snapshot or its conversion, without reading the weights;
    `weights sha256 <digest>` of the names and contents of any other folder's files (what from_pretrained reads:
    the top level, hidden files aside), so a moved folder is the same model and a rebuilt one another. `digest`
    gives a file's sha256 (the generation cache remembers them across processes)."""
    if name is None:
        return None
    folder = Path(name).expanduser()
    if folder.is_dir():
        origin = hub_origin(folder)
        if origin is not None:
            return f"hub {origin[0]}@{origin[1]}"
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != CONVERTED_RECORD
        )
        combined = hashlib.sha256()
        for p in files:
            combined.update(f"{p.name}\0{digest(p)}\n".encode())
        return f"weights sha256 {combined.hexdigest()[:16]}"
    if is_local(name):
        check_model_path(name, weights=False)  # a path written as local: not a Hub id
        raise ModelNotFoundError(f"{name}: no such model folder")
    # Only the configs are fetched: the commit is in the snapshot folder's name.
    snapshot = hub_snapshot(name, revision, allow_patterns=["config.json", "adapter_config.json"])
    return f"hub {name}@{snapshot.commit}"
