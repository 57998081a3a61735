"""Everything a run config names on the Hugging Face Hub, and its sacreBLEU test sets, fetched into the standard
caches before a run (`alma-r download`), so that the run itself can go without the network (HF_HUB_OFFLINE=1).

The items, in the order a run needs them:

- `model.base` at `model.revision`, `model.adapter` at `model.adapter_revision`: through the run's own rule
  (models/weights.py `resolve_weights`), so what is fetched is what a run loads (config, tokenizer, safetensors),
  a pickle-only revision is refused as the run would refuse it, and an allowed one is converted here, once;
- each COMET model a metric of `score.metrics` or `evaluate.metrics` names (`score.comet_models[m]`, at its
  revision), then the encoder its hparams.yaml names as `pretrained_model` (config and tokenizer files only:
  COMET builds the encoder from them and loads the weights from its own checkpoint);
- each hf_dataset source's dataset at its revision, checked to hold the files of every config and split a
  source reads;
- each sacrebleu source's test set, per direction, through sacreBLEU's own API (into $SACREBLEU).

`model.base: tiny` and local folders or files are listed as local and left alone. Idempotent: an item already
in the cache is reported present and nothing is fetched again. With HF_HUB_OFFLINE=1 nothing is fetched at
all: each item is looked up in the cache and reported present or missing (allowed pickle weights found there
are converted all the same, as the run would convert them: that needs no network).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alma_r.config import RunConfig, config_base_dir, resolve_path
from alma_r.data.hub import HubError, HubSnapshot, hub_snapshot, is_local, offline
from alma_r.tasks.runtime.failures import one_line
from alma_r.tasks.shared.scoring import comet_model_path

# What a status means; the first four leave the item usable by a run.
DOWNLOADED = "downloaded"  # fetched now
CONVERTED = "converted"  # pickle weights turned into safetensors now, in the cache
PRESENT = "present"  # already in the cache: nothing fetched
LOCAL = "local"  # a local folder or file (or the tiny model): not the Hub's
MISSING = "missing"  # offline, and not (completely) in the cache
REFUSED = "refused"  # pickle-only weights, model.allow_pickle_weights off
FAILED = "failed"  # anything else: the Hub's or sacreBLEU's reason
AVAILABLE = (DOWNLOADED, CONVERTED, PRESENT, LOCAL)
NOT_CACHED = "not in the cache, and HF_HUB_OFFLINE is set: nothing is fetched"

# COMET reads its encoder's config and tokenizer (the weights are in its own checkpoint): the encoder repository
# is fetched without its multi-GB weights. Tokenizers ship as tokenizer.json or a sentencepiece model.
ENCODER_FILES = ["*.json", "*.model", "*.txt"]
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "spiece.model", "vocab.txt", "vocab.json")


@dataclass
class Item:
    """One thing a run needs from the Hub or sacreBLEU, and what fetching it found."""

    kind: str  # model, adapter, comet, encoder, dataset, sacrebleu
    name: str  # Hub id or local path; sacrebleu: the test set
    revision: str | None = None  # Hub revision asked for (None: main); sacrebleu: the direction
    used_by: list[str] = field(default_factory=list)  # the config keys that name it
    splits: list[tuple[str | None, str]] = field(default_factory=list)  # dataset: (config, split) read
    status: str = ""
    commit: str | None = None
    size: int | None = None  # bytes on disk
    where: str | None = None
    problem: str | None = None  # why it is missing, refused or failed

    @property
    def label(self) -> str:
        if self.kind == "sacrebleu":
            return f"sacrebleu {self.name} {self.revision}"
        if self.status == LOCAL:
            return f"{self.kind} {self.name}"
        return f"{self.kind} {self.name}@{self.revision or 'main'}"

    @property
    def available(self) -> bool:
        return self.status in AVAILABLE

    def line(self) -> str:
        """The item's outcome in one line: `comet Unbabel/XCOMET-XXL@main: missing (<why>; named by
        score.comet_models.xcomet_xxl)`."""
        done = f"{self.label}: {self.status}"
        if self.problem:
            named = ", ".join(self.used_by[:3]) + (", ..." if len(self.used_by) > 3 else "")
            return f"{done} ({self.problem}; named by {named})" if named else f"{done} ({self.problem})"
        return f"{done} ({human_size(self.size)})" if self.size is not None else done


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (a snapshot's links followed to their blobs)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- what the config names ----------------------------------------------------------------------------------------


def used_comet_metrics(cfg: RunConfig) -> list[str]:
    """The COMET metrics a run scores with (selection first, then evaluation), each once."""
    names = [*cfg.score.metrics, *cfg.evaluate.metrics]
    return [m for i, m in enumerate(names) if m in cfg.score.comet_models and m not in names[:i]]


def plan(cfg: RunConfig) -> list[Item]:
    """The items the config names, each once (several keys naming one item are listed in `used_by`). COMET
    encoders are not among them: their ids are in the COMET checkpoints, known once those are fetched."""
    items: dict[tuple, Item] = {}

    def add(key: tuple, used_by: str, **fields) -> Item:
        item = items.setdefault(key, Item(**fields))
        item.used_by.append(used_by)
        return item

    model = cfg.model
    if model.base == "tiny":
        add(("model", "tiny"), "model.base", kind="model", name="tiny")
    else:
        add(
            ("model", model.base, model.revision),
            "model.base",
            kind="model",
            name=model.base,
            revision=model.revision,
        )
    if model.adapter:
        add(
            ("adapter", model.adapter, model.adapter_revision),
            "model.adapter",
            kind="adapter",
            name=model.adapter,
            revision=model.adapter_revision,
        )
    for metric in used_comet_metrics(cfg):
        spec = cfg.score.comet_models[metric]
        add(
            ("comet", spec.model, spec.revision),
            f"score.comet_models.{metric}",
            kind="comet",
            name=spec.model,
            revision=spec.revision,
        )
    base_dir = config_base_dir(cfg)
    for i, source in enumerate(cfg.ingest.sources):
        where = f"ingest.sources[{i}]"
        if source.kind == "hf_dataset":
            name = source.dataset_location(base_dir)
            item = add(
                ("dataset", name, source.revision), where, kind="dataset", name=name, revision=source.revision
            )
            split = (source.dataset_config, source.hf_split or source.split)
            if split not in item.splits:
                item.splits.append(split)
        elif source.kind == "sacrebleu":
            for lp in source.directions:
                add(
                    ("sacrebleu", source.test_set, lp),
                    where,
                    kind="sacrebleu",
                    name=source.test_set,
                    revision=lp,
                )
    return list(items.values())


# --- fetching -----------------------------------------------------------------------------------------------------


def hub_cache_folder(repo_id: str, repo_type: str) -> Path:
    """The repository's folder in the Hub cache (HF_HUB_CACHE, under HF_HOME)."""
    from huggingface_hub import constants

    # the cache's own naming, unvalidated: a malformed id is for hub_snapshot to reject, in its one line
    return Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def cache_state(repo_id: str, repo_type: str) -> dict[str, int]:
    """The repository's blobs in the Hub cache, name -> size: a fetch that downloaded anything changed them.
    Only the blobs: refs are rewritten and `.no_exist` markers added by lookups that fetch nothing."""
    blobs = hub_cache_folder(repo_id, repo_type) / "blobs"
    return {p.name: p.stat().st_size for p in blobs.iterdir() if p.is_file()} if blobs.is_dir() else {}


def _done(item: Item, snapshot: HubSnapshot, before: dict[str, int], need: list[str]) -> Item:
    """Fill in a resolved item: a snapshot missing a file the run reads is missing (offline) or failed."""
    folder = snapshot.path
    item.commit, item.where, item.size = snapshot.commit, str(folder), folder_size(folder)
    absent = [name for name in need if not any(folder.glob(name))]
    if absent:
        item.status = MISSING if offline() else FAILED
        item.problem = f"the {'cached ' if offline() else ''}snapshot has no {' or '.join(absent)}"
        return item
    if snapshot.repo_id is None:
        item.status = LOCAL
    else:
        item.status = DOWNLOADED if cache_state(snapshot.repo_id, snapshot.repo_type) != before else PRESENT
    return item


def local(item: Item, path: Path) -> Item:
    """A local folder or file the config names: left as it is, if it is there."""
    item.where = str(path)
    if not path.exists():
        item.status, item.problem = FAILED, f"{path}: no such file or folder"
    else:
        item.status, item.size = LOCAL, folder_size(path)
    return item


def _failed(item: Item, err: BaseException) -> Item:
    from alma_r.models.weights import RefusedWeightsError

    item.status, item.problem = FAILED, one_line(err)
    if isinstance(err, RefusedWeightsError):
        item.status = REFUSED
    elif offline() and isinstance(err, HubError):  # the Hub's reason is its cache lookup: say it plainly
        item.status, item.problem = MISSING, NOT_CACHED
    return item


def fetch_weights(item: Item, cfg: RunConfig) -> Item:
    """A base model or adapter, by the rule the run loads it with."""
    from alma_r.models.weights import CONVERTED_RECORD, resolve_weights

    if item.name == "tiny":
        item.status, item.problem = LOCAL, None
        item.where = "built by the prepare_model stage"
        return item
    if is_local(item.name):
        return local(item, Path(item.name).expanduser().resolve())
    before = cache_state(item.name, "model")
    conversions = converted_folders()
    revision_field = "model.revision" if item.kind == "model" else "model.adapter_revision"
    try:
        snapshot = resolve_weights(
            item.name,
            item.revision,
            kind=item.kind,
            allow_pickle=cfg.model.allow_pickle_weights,
            trust_remote_code=cfg.model.trust_remote_code,
            revision_field=revision_field,
            allow_field="model.allow_pickle_weights",
        )
    except OSError as err:
        return _failed(item, err)
    need = ["config.json"] if item.kind == "model" else ["adapter_config.json"]
    _done(item, snapshot, before, need)
    if item.available and (snapshot.path / CONVERTED_RECORD).is_file() and snapshot.path not in conversions:
        item.status = CONVERTED  # read from the pickle files now; a later run finds the conversion present
    return item


def converted_folders() -> set[Path]:
    """The conversions of pickle weights in the Hub cache (models/weights.py), one folder per repository and
    commit: one that appears during a fetch was made by it."""
    from huggingface_hub import constants

    from alma_r.models.weights import CONVERTED_DIR

    root = Path(constants.HF_HUB_CACHE) / CONVERTED_DIR
    return {p for p in root.glob("*/*") if p.is_dir()} if root.is_dir() else set()


def local_comet(value: str, base_dir: Path) -> Path | None:
    """The local checkpoint or model folder a COMET model names (scoring's rule: a path beside the config, or
    anything written as a path or a .ckpt, even when it is not there), None for a Hub id."""
    from alma_r.models.score.comet_scorer import is_hub_id

    found = comet_model_path(value, base_dir)
    return None if is_hub_id(found) else resolve_path(found, base_dir)


def fetch_comet(item: Item, cfg: RunConfig) -> tuple[Item, str | None]:
    """A COMET model and the encoder id its hparams.yaml names (None when it names a folder, or is unread)."""
    path = local_comet(item.name, config_base_dir(cfg))
    if path is not None:
        if not local(item, path).available:
            return item, None
        folder = path.parents[1] if path.is_file() else path  # a .ckpt: <model>/checkpoints/model.ckpt
    else:
        from alma_r.models.score.comet_scorer import download

        before = cache_state(item.name, "model")
        try:  # the scorer's own download: the same files, the same one-line errors
            checkpoint = download(item.name, item.revision)
        except HubError as err:
            return _failed(item, err), None
        folder = checkpoint.parents[1]
        snapshot = HubSnapshot(folder, item.name, "model", item.revision, folder.name)  # named by its commit
        _done(item, snapshot, before, ["checkpoints/model.ckpt", "hparams.yaml"])
        if not item.available:
            return item, None
        folder = snapshot.path
    hparams_file = folder / "hparams.yaml"
    if not hparams_file.is_file():
        return item, None
    encoder = (yaml.safe_load(hparams_file.read_text(encoding="utf-8")) or {}).get("pretrained_model")
    if not encoder or is_local(str(encoder)):
        return item, None
    return item, str(encoder)


def fetch_encoder(item: Item) -> Item:
    before = cache_state(item.name, "model")
    try:
        snapshot = hub_snapshot(item.name, item.revision, allow_patterns=ENCODER_FILES)
    except HubError as err:
        return _failed(item, err)
    _done(item, snapshot, before, ["config.json"])
    if item.available and not any((snapshot.path / name).is_file() for name in TOKENIZER_FILES):
        item.status = MISSING if offline() else FAILED
        item.problem = f"no tokenizer file ({', '.join(TOKENIZER_FILES)}) in the snapshot"
    return item


def fetch_dataset(item: Item) -> Item:
    """A dataset repository, whole (as ingest resolves it), then each config and split a source reads: its
    files must be there."""
    from alma_r.data.hub_datasets import resolve_split

    if is_local(item.name):
        return local(item, Path(item.name))
    before = cache_state(item.name, "dataset")
    try:
        snapshot = hub_snapshot(item.name, item.revision, repo_type="dataset")
    except HubError as err:
        return _failed(item, err)
    _done(item, snapshot, before, [])
    for config, split in item.splits:
        try:
            resolved = resolve_split(str(snapshot.path), config, split)
        except Exception as err:  # datasets' own errors (no such config, no data files) vary by cause
            item.status = MISSING if offline() else FAILED
            item.problem = f"config {config or 'default'} split {split}: {one_line(err)}"
            return item
        absent = [p for p in resolved.data_files if not p.is_file()]
        if absent or not resolved.data_files:
            item.status = MISSING if offline() else FAILED
            item.problem = f"config {config or 'default'} split {split}: no data files in the snapshot"
            return item
    return item


def fetch_sacrebleu(item: Item) -> Item:
    """One direction of a sacreBLEU test set, by sacreBLEU's API: it downloads the test set's archive into
    $SACREBLEU once and extracts the direction's text files. Offline it only looks for the archive."""
    from sacrebleu.dataset import DATASETS

    name, lp = item.name, item.revision
    if name not in DATASETS:
        item.status, item.problem = FAILED, f"unknown sacreBLEU test set '{name}' (see `sacrebleu --list`)"
        return item
    dataset = DATASETS[name]
    if lp not in dataset.langpairs:
        item.status, item.problem = FAILED, f"{name} has no direction {lp}"
        return item
    # sacreBLEU keeps no index of what it holds: its archives under <SACREBLEU>/<name>/raw/ are the record
    # (its own download check is the same: a non-empty archive is not fetched again).
    raw = Path(dataset._rawdir)
    archives = [raw / dataset._get_tarball_filename(url) for url in dataset.data]
    had = all(p.is_file() and p.stat().st_size > 0 for p in archives)
    item.where = str(Path(dataset._outdir))
    if offline():
        if not had:
            item.status, item.problem = MISSING, f"{NOT_CACHED} (no {archives[0].name} in {raw})"
            return item
        item.status, item.size = PRESENT, sum(p.stat().st_size for p in archives)
        return item
    try:
        dataset.process_to_text(lp)
        files = [Path(f) for f in dataset.get_files(lp)]
    except SystemExit:  # sacreBLEU exits on a bad checksum or an SSL error, after logging why
        item.status, item.problem = (
            FAILED,
            f"sacreBLEU could not download {name} (its message above says why)",
        )
        return item
    except Exception as err:  # urllib's and tarfile's errors, as they come
        item.status, item.problem = FAILED, one_line(err)
        return item
    item.status = PRESENT if had else DOWNLOADED
    item.size = sum(p.stat().st_size for p in (*archives, *files) if p.is_file())
    return item


def prefetch(cfg: RunConfig, report: Callable[[int, int, Item], None] | None = None) -> list[Item]:
    """Fetch (or, offline, look up) every item the config names; `report(i, n, item)` after each, n being
    the items known so far (a COMET model adds its encoder after it)."""
    items = plan(cfg)
    encoders: dict[str, Item] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if item.kind in ("model", "adapter"):
            fetch_weights(item, cfg)
        elif item.kind == "comet":
            _, encoder = fetch_comet(item, cfg)
            if encoder is not None:
                if encoder in encoders:
                    encoders[encoder].used_by.append(f"{item.name} hparams.yaml")
                else:
                    encoders[encoder] = Item("encoder", encoder, used_by=[f"{item.name} hparams.yaml"])
                    items.insert(i + 1, encoders[encoder])
        elif item.kind == "encoder":
            fetch_encoder(item)
        elif item.kind == "dataset":
            fetch_dataset(item)
        elif item.kind == "sacrebleu":
            fetch_sacrebleu(item)
        i += 1
        if report is not None:
            report(i, len(items), item)
    return items


COLUMNS = ("kind", "id", "revision", "commit", "size", "where", "status")


def table(items: list[Item]) -> str:
    """The items as an aligned text table, one row each."""
    rows = [COLUMNS] + [
        (
            item.kind,
            item.name,
            item.revision or ("-" if item.status == LOCAL else "main"),
            item.commit or "-",
            human_size(item.size),
            item.where or "-",
            item.status,
        )
        for item in items
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def unavailable(items: list[Item]) -> list[Item]:
    return [item for item in items if not item.available]


def caches() -> str:
    """Where the items go: the Hub cache and sacreBLEU's folder, as this process sees them."""
    from huggingface_hub import constants
    from sacrebleu.utils import SACREBLEU_DIR

    return f"Hub cache {constants.HF_HUB_CACHE}, sacreBLEU {SACREBLEU_DIR}"
