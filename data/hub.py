"""Hugging Face Hub repositories as local folders: the one rule by which models, adapters, COMET checkpoints and
datasets named in a config become files on disk.

A name that is a local folder stays one. Anything else is a Hub repository id, resolved at a revision (a branch,
a tag, `refs/pr/N` or a commit sha; None is `main`) by `huggingface_hub.snapshot_download` into the standard
cache (`HF_HOME`/`HF_HUB_CACHE`). With `HF_HUB_OFFLINE=1` the same call answers from the cache alone, so a run
prefetched by `alma-r download` needs no network. The folder of a cached snapshot is named by its commit, so a
resolved repository is recorded as (id, revision asked for, commit it resolved to).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path


class HubError(OSError):
    """A repository that cannot be resolved: one line naming it, its revision and the Hub's reason."""


@dataclass(frozen=True)
class HubSnapshot:
    path: Path  # the local folder holding the repository's files
    repo_id: str | None  # None: a local folder named in the config
    repo_type: str  # "model" or "dataset"
    revision: str | None  # as configured (None: main)
    commit: str | None  # the commit sha the revision resolved to (None for a local folder)

    def record(self) -> dict:
        """How run.json and download tables show it."""
        return {**asdict(self), "path": str(self.path)}

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}" if self.repo_id else str(self.path)


def is_local(name: str) -> bool:
    """A name written as a path (absolute, ./, ../, ~) or an existing folder; anything else is a Hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(
    name: str,
    revision: str | None = None,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
) -> HubSnapshot:
    """The local folder of `name` at `revision`: the folder itself, or the Hub repository's cached snapshot
    (downloading the files `allow_patterns` selects unless offline)."""
    if is_local(name):
        path = Path(name).expanduser().resolve()
        if not path.is_dir():
            raise HubError(f"{name}: no such folder")
        return HubSnapshot(path, None, repo_type, None, None)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id=name,
                repo_type=repo_type,
                revision=revision,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
        )
    except Exception as err:  # the Hub's errors differ by cause (gated, missing, offline); keep its reason
        hint = (
            " (HF_HUB_OFFLINE is set and it is not in the cache: run `alma-r download --config ...` where the "
            "Hub is reachable)"
            if offline()
            else ""
        )
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise HubError(
            f"{repo_type} {name}@{revision or 'main'}: cannot resolve{hint}: {type(err).__name__}: {reason}"
        ) from None
    return HubSnapshot(folder, name, repo_type, revision, folder.name)


def snapshot_of(path: str | Path) -> tuple[str, str, str] | None:
    """(repo_type, repo_id, commit) when `path` lies inside a Hub cache snapshot
    (`.../<type>s--<org>--<name>/snapshots/<commit>/...`), else None: a cached snapshot is identified by its
    commit, without reading its (possibly many-GB) files."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i + 1] == "snapshots" and "--" in parts[i]:
            kind, _, repo = parts[i].partition("--")
            if kind in ("models", "datasets", "spaces"):
                return kind[:-1], repo.replace("--", "/"), parts[i + 2]
    return None
