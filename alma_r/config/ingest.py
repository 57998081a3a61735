"""The ingest section: the sources a run reads (local files, sacreBLEU test sets, Hugging Face datasets)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from alma_r.config.base import Section, resolve_path
from alma_r.data.languages import split_lp


class SourceConfig(Section):
    """One input of the ingest stage."""

    kind: Literal["alma_json", "aligned_text", "sacrebleu", "hf_dataset"] = Field(
        description="alma_json: ALMA's {'translation': {..}} JSON lines or list; aligned_text: two line-aligned "
        "plain-text files; sacrebleu: a WMT test set through sacrebleu's API (needs the internet once); "
        "hf_dataset: a Hugging Face dataset (Hub id at a revision, or a local dataset folder)."
    )
    name: str = Field(
        description="Origin name recorded on every segment, e.g. 'wmt22' or 'alma-human-written'."
    )
    pair: str = Field(description="Language pair of the files, e.g. 'de-en'.")
    directions: list[str] = Field(description="Directions to emit from the pair, e.g. ['de-en', 'en-de'].")
    split: Literal["train", "valid", "test"] = "train"
    path: str | None = Field(None, description="alma_json: the file.")
    files: dict[str, str] | None = Field(None, description="aligned_text: {lang: file} for both languages.")
    test_set: str | None = Field(None, description="sacrebleu: test set name, e.g. 'wmt22'.")
    max_segments: int | None = Field(None, ge=1, description="Read only the first N items/lines.")
    dataset: str | None = Field(
        None, description="hf_dataset: Hub id (e.g. haoranxu/ALMA-R-Preference) or a local dataset folder."
    )
    dataset_config: str | None = Field(
        None, description="hf_dataset: the dataset's config name, e.g. 'de-en'."
    )
    hf_split: str | None = Field(
        None, description="hf_dataset: the dataset's split to read (default: `split`)."
    )
    revision: str | None = Field(
        None, description="hf_dataset: branch, tag, refs/pr/N or commit sha of the Hub dataset (None: main)."
    )
    translation_field: str = Field(
        "translation",
        description="hf_dataset: the struct column holding {lang: text} (ALMA-R-Preference: 'translation'; "
        "WMT22-Test: the config's name, e.g. 'cs-en'). Unused when `columns` is given.",
    )
    columns: dict[str, str] | None = Field(
        None, description="hf_dataset with flat columns: {lang: column} for both languages of the pair."
    )
    systems: dict[str, str] | None = Field(
        None,
        description="hf_dataset: translations the dataset carries, {system name: field prefix}; the translation "
        "into <tgt> is `<prefix>_<tgt>` (ALMA-R-Preference: {gpt4: gpt4, alma-13b-lora: alma}). A generate "
        "system with backend `ingested` and the same name turns them into candidates.",
    )
    published_scores: list[str] = Field(
        default_factory=list,
        description="hf_dataset: scores the dataset carries for those translations, `<prefix>_<tgt>_<name>` and "
        "`ref_<tgt>_<name>` for the reference (ALMA-R-Preference: kiwi, xcomet, kiwi_xcomet); the score stage's "
        "metric `published:<name>` reads them instead of running a model.",
    )
    preference_field: str | None = Field(
        None,
        description="hf_dataset: a human preference label between the first two `systems` (ALMA-R-Preference: "
        "Delta; > 0 prefers the first, < 0 the second, 0 or null: no label). select.human_preferences uses it.",
    )
    direction_field: str | None = Field(
        None,
        description="hf_dataset: a field that, when non-empty, names the only direction to emit for the row "
        "(ALMA-R-Preference: required_directions).",
    )

    @field_validator("pair")
    @classmethod
    def _known_pair(cls, v: str) -> str:
        split_lp(v)
        return v

    @field_validator("directions")
    @classmethod
    def _known_directions(cls, v: list[str]) -> list[str]:
        for lp in v:
            split_lp(lp)
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> SourceConfig:
        need = {
            "alma_json": "path",
            "aligned_text": "files",
            "sacrebleu": "test_set",
            "hf_dataset": "dataset",
        }[self.kind]
        if getattr(self, need) is None:
            raise ValueError(f"source '{self.name}' of kind {self.kind} needs '{need}'")
        if self.kind == "aligned_text" and set(self.files) != set(split_lp(self.pair)):
            raise ValueError(
                f"source '{self.name}': files has languages {sorted(self.files)}, pair is {self.pair}"
            )
        return self

    def dataset_location(self, base_dir: Path) -> str:
        """hf_dataset: a dataset written as a path (or an existing folder beside the config) is that folder,
        resolved against the config's folder as every other input path; anything else is a Hub id."""
        path = resolve_path(self.dataset, base_dir)
        local = self.dataset.startswith(("sample:", ".", "/", "~")) or path.is_dir()
        return str(path) if local else self.dataset


class IngestSection(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    max_segments_per_source: int | None = Field(
        None,
        ge=1,
        description="Read at most the first N items of every source (a source's own max_segments wins when "
        "smaller): a small run of a big config, e.g. a rehearsal with --set ingest.max_segments_per_source=8.",
    )
