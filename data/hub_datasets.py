"""Hugging Face datasets as ingest sources: one split of one config of a dataset (a Hub id at a revision, or a
local dataset folder) -> segment rows, and, when the dataset carries them, other systems' translations, their
published scores and human preference labels (ALMA-R-Preference: GPT-4's and ALMA-13B-LoRA's translations,
KIWI-XXL / XCOMET-XXL scores, the `Delta` label).

The dataset becomes a folder by data/hub.py's one rule (`hub_snapshot`, the Hub cache, HF_HUB_OFFLINE), and that
folder is read with `datasets.load_dataset(<folder>, <config>, split=...)`: `load_dataset("<org>/<name>")` itself
refuses to work offline even with the repository cached, a folder does not. The configs are those the folder
declares (README.md front matter), so one code path reads the Hub, its cache and a dataset written by hand.

Validation is as strict as data/readers.py's for local files, and every problem is one line
`<dataset>:<config>:<split>:<row>: <problem>` (row 1-based; 0 for the dataset as a whole) raised as IngestError.

A field named in the source (a language, a system's translation, a score, the label, the direction) is looked up
in the translation struct first, then among the row's own columns: ALMA-R-Preference keeps everything inside
`translation`, a flat dataset (`columns`) keeps it all at the top level.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from alma_r.data.hub import HubSnapshot, hub_snapshot
from alma_r.data.languages import split_lp
from alma_r.data.readers import IngestError, _check_text
from alma_r.data.schemas import REFERENCE

PUBLISHED_PREFIX = "published:"  # the metric name of a score a dataset carries: published:<name>
REFERENCE_PREFIX = "ref"  # ALMA-R-Preference's field prefix of the reference's scores: ref_<tgt>_<name>


def published_name(metric: str) -> str | None:
    """`published:<name>` -> <name>; None for any other metric."""
    name = metric[len(PUBLISHED_PREFIX) :] if metric.startswith(PUBLISHED_PREFIX) else ""
    return name or None


@dataclass(frozen=True)
class DatasetSplit:
    """One split of one config of a dataset, resolved to files on disk."""

    name: str  # the dataset as given: Hub id, or the local folder
    config: str | None  # None: the dataset's only (default) config
    split: str  # the dataset's split name, e.g. "train" or "test"
    snapshot: HubSnapshot
    data_files: tuple[Path, ...]  # the split's data files (+ README.md, which declares the configs)

    @property
    def where(self) -> str:
        """The prefix of every error about it."""
        return f"{self.name}:{self.config or 'default'}:{self.split}"


def resolve_split(name: str, config: str | None, split: str, revision: str | None = None) -> DatasetSplit:
    """The dataset's folder (a Hub snapshot at `revision`, or the local folder) and the files of its `config`'s
    `split`; an unknown config or split is one line naming the ones the dataset has."""
    import datasets

    snapshot = hub_snapshot(name, revision, repo_type="dataset")
    where = f"{name}:{config or 'default'}:{split}"
    folder = str(snapshot.path)
    configs = datasets.get_dataset_config_names(folder)
    if config is None and len(configs) > 1:
        raise IngestError(
            f"{where}:0: the dataset has several configs, name one in dataset_config: {configs}"
        )
    if config is not None and config not in configs:
        raise IngestError(f"{where}:0: no config '{config}' in the dataset (configs: {configs})")
    builder = datasets.load_dataset_builder(folder, config)
    by_split = builder.config.data_files or {}
    if split not in by_split:
        raise IngestError(
            f"{where}:0: no split '{split}' in config '{builder.config.name}' (splits: {list(by_split)})"
        )
    files = [Path(str(p)) for p in by_split[split]]
    readme = snapshot.path / "README.md"
    if readme.is_file():  # it declares the configs and may declare the features
        files.append(readme)
    return DatasetSplit(name, config, split, snapshot, tuple(files))


@dataclass
class DatasetRows:
    """What one dataset source yields, in the layouts of data/schemas.py: SEGMENTS, INGESTED_TRANSLATIONS,
    PUBLISHED_SCORES and HUMAN_PREFERENCES rows (the last three empty unless the source names the fields)."""

    segments: list[dict] = field(default_factory=list)
    translations: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)
    preferences: list[dict] = field(default_factory=list)


class _Row:
    """One dataset row with the source's field lookup: the translation struct first, then the row's columns."""

    def __init__(self, where: str, number: int, row: dict, struct: dict | None, struct_name: str | None):
        self.where, self.number, self.row = where, number, row
        self.struct, self.struct_name = struct, struct_name

    def error(self, problem: str) -> IngestError:
        return IngestError(f"{self.where}:{self.number}: {problem}")

    def get(self, name: str) -> tuple[str, object]:
        """(label, value) of field `name`; label is how errors name it (`translation.de` or `de`)."""
        if self.struct is not None and name in self.struct:
            return f"{self.struct_name}.{name}", self.struct[name]
        if name in self.row and name != self.struct_name:
            return name, self.row[name]
        has = sorted(self.struct or {}) + sorted(c for c in self.row if c != self.struct_name)
        label = f"{self.struct_name}.{name}" if self.struct is not None else name
        raise self.error(f"field '{label}' is missing (has {has})")

    def text(self, name: str) -> str:
        label, value = self.get(name)
        return _check_text(self.where, self.number, label, value)

    def number_or_none(self, name: str) -> float | None:
        """A published number: None when null (no value for this row), else a finite float."""
        label, value = self.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"field '{label}' is {type(value).__name__}, expected a number")
        if not math.isfinite(value):
            raise self.error(f"field '{label}' is {value}, expected a finite number")
        return float(value)


def read_dataset_split(
    resolved: DatasetSplit,
    pair: str,
    directions: list[str],
    split: str,
    origin: str,
    translation_field: str = "translation",
    columns: dict[str, str] | None = None,
    systems: dict[str, str] | None = None,
    published_scores: list[str] = (),
    preference_field: str | None = None,
    direction_field: str | None = None,
    max_rows: int | None = None,
) -> DatasetRows:
    """Rows of a resolved split -> DatasetRows. One segment per (row, requested direction), id
    `<origin>:<lp>:<row>` (row 1-based in the split), split = our `split` (train/valid/test).

    translation_field: the struct column {lang: text} (ignored when `columns` = {lang: column} is given);
    systems: {system name: field prefix}, the translation into <tgt> being `<prefix>_<tgt>`; published_scores:
    names whose scores are `<prefix>_<tgt>_<name>` for each system and `ref_<tgt>_<name>` for the reference, as
    metric `published:<name>` (a null score: no row, the score stage names what is missing); preference_field:
    a label between the first two systems (> 0 prefers the first, < 0 the second, 0 or null: no label);
    direction_field: when non-empty, the only direction the row is emitted for (ALMA's required_directions);
    max_rows: read the first N rows.
    """
    import datasets

    where = resolved.where
    try:
        a, b = split_lp(pair)
        parsed = {lp: split_lp(lp) for lp in directions}
    except ValueError as err:
        raise IngestError(f"{where}:0: {err}") from None
    for lp, (src, tgt) in parsed.items():
        if {src, tgt} != {a, b}:
            raise IngestError(f"{where}:0: direction '{lp}' is not a direction of the pair '{pair}'")
    if columns is not None and set(columns) != {a, b}:
        raise IngestError(f"{where}:0: columns has languages {sorted(columns)}, pair is {pair}")
    systems = dict(systems or {})
    if preference_field and len(systems) < 2:
        raise IngestError(
            f"{where}:0: preference_field '{preference_field}' labels the first two systems, "
            f"systems has {list(systems)}"
        )
    if (published_scores or preference_field) and not systems:
        raise IngestError(f"{where}:0: published_scores and preference_field need the source's systems")

    # A throwaway Arrow cache: `datasets` keys its cache of a local folder by the files' paths, not their
    # content, so an edited local dataset would be read as it was (the ingest key, by content, would not know).
    with tempfile.TemporaryDirectory(prefix="alma-r-dataset-") as cache_dir:
        table = datasets.load_dataset(
            str(resolved.snapshot.path), resolved.config, split=resolved.split, cache_dir=cache_dir
        )
        if max_rows is not None:
            table = table.select(range(min(max_rows, len(table))))
        records = table.to_list()
        del table  # it maps files of cache_dir
    out = DatasetRows()
    # Both sides of a pair in the layout's own field names.
    lang_fields = columns if columns is not None else {a: a, b: b}
    struct_name = None if columns is not None else translation_field
    for number, record in enumerate(records, start=1):
        struct = None
        if struct_name is not None:
            struct = record.get(struct_name)
            if not isinstance(struct, dict):
                raise IngestError(
                    f"{where}:{number}: field '{struct_name}' is missing or not an object (has {sorted(record)})"
                )
        row = _Row(where, number, record, struct, struct_name)
        text = {lang: row.text(lang_fields[lang]) for lang in (a, b)}
        wanted = list(directions)
        if direction_field:
            label, only = row.get(direction_field)
            if only is not None and not isinstance(only, str):
                raise row.error(f"field '{label}' is {type(only).__name__}, expected a string")
            if only:
                try:
                    src, tgt = split_lp(only)
                except ValueError as err:
                    raise row.error(f"field '{label}': {err}") from None
                if {src, tgt} != {a, b}:
                    raise row.error(f"field '{label}' names '{only}', not a direction of the pair '{pair}'")
                wanted = [lp for lp in directions if lp == only]
        label_value = row.number_or_none(preference_field) if preference_field else None
        for lp in wanted:
            src, tgt = parsed[lp]
            sid = f"{origin}:{lp}:{number}"
            out.segments.append(
                {
                    "id": sid,
                    "lp": lp,
                    "src_lang": src,
                    "tgt_lang": tgt,
                    "src": text[src],
                    "ref": text[tgt],
                    "origin": origin,
                    "split": split,
                }
            )
            keys = {"segment_id": sid, "lp": lp}
            for system, prefix in systems.items():
                out.translations.append(
                    {**keys, "system": system, "hypothesis": row.text(f"{prefix}_{tgt}"), "origin": origin}
                )
            scored = [*systems.items(), (REFERENCE, REFERENCE_PREFIX)]
            for name in published_scores:
                for system, prefix in scored:
                    value = row.number_or_none(f"{prefix}_{tgt}_{name}")
                    if value is not None:
                        out.scores.append(
                            {
                                **keys,
                                "system": system,
                                "metric": PUBLISHED_PREFIX + name,
                                "score": value,
                                "origin": origin,
                            }
                        )
            if label_value:  # 0 and null: no label, the metrics decide
                first, second = list(systems)[:2]
                chosen, rejected = (first, second) if label_value > 0 else (second, first)
                out.preferences.append(
                    {
                        **keys,
                        "chosen_system": chosen,
                        "rejected_system": rejected,
                        "label": label_value,
                        "origin": origin,
                    }
                )
    return out
