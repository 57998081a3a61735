"""The generate section: the candidate systems (policy decodings, endpoints, files, ingested translations)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alma_r.config.base import Section
from alma_r.models.result_fields import NOT_A_RESULT


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


# The backends that use each DecodingConfig field beyond name and backend (ingested uses none). The endpoint
# honours do_sample, temperature, top_p, max_new_tokens and n (models/generate/openai_backend.py), not beams or
# top_k; shots build prompts, which the file and ingested systems do not.
_PROMPTED = ("hf", "vllm", "openai")
BACKEND_FIELDS: dict[str, tuple[str, ...]] = {
    "num_beams": ("hf", "vllm"),
    "top_k": ("hf", "vllm"),
    **dict.fromkeys(
        (
            "do_sample",
            "temperature",
            "top_p",
            "max_new_tokens",
            "n",
            "shots",
            "shots_dir",
            "rerank",
            "rerank_metric",
        ),
        _PROMPTED,
    ),
    **dict.fromkeys(("files", "file_format", "jsonl_field"), ("file",)),
    "endpoint": ("openai",),
    **dict.fromkeys(("vllm_python", "tensor_parallel_size"), ("vllm",)),
}


def _default(section: Section, field: str):
    return type(section).model_fields[field].get_default(call_default_factory=True)


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
    rerank: Literal["none", "qe_rerank", "mbr"] = Field(
        "none",
        description="Quality-aware decoding of the n samples into one candidate, system <name>: qe_rerank (the "
        "best by a reference-free metric) or mbr (the highest expected utility against the other samples); "
        "scored through the score cache.",
    )
    rerank_metric: str | None = Field(
        None,
        description="rerank's metric: qe_rerank a reference-free one (default consensus_chrf, or a "
        "score.comet_models entry with reference: false); mbr the utility (default chrf; bleu or a COMET "
        "model with reference: true).",
    )
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
        # A field its backend ignores (beams asked of an endpoint, files of a model) would silently do nothing.
        # Only a value other than the default counts: a config handed to a stage's child process is dumped
        # whole and validated again, so there every field is "set", and a default changes nothing anyway.
        for field in (f for f in type(self).model_fields if f in self.model_fields_set):  # declared order
            used_by = BACKEND_FIELDS.get(field)
            if used_by and self.backend not in used_by and getattr(self, field) != _default(self, field):
                which = f"backend {used_by[0]}" if len(used_by) == 1 else f"backends {', '.join(used_by)}"
                raise ValueError(
                    f"system '{self.name}': {field} is a field of {which}, this system's backend is "
                    f"{self.backend} (drop {field} or change the backend)"
                )
        if self.backend == "file" and not self.files:
            raise ValueError(f"system '{self.name}': backend file needs files: {{lp: path}}")
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError(f"system '{self.name}': backend openai needs endpoint: {{base_url, model}}")
        if self.rerank != "none" and self.n < 2:
            raise ValueError(
                f"system '{self.name}': rerank {self.rerank} chooses among n >= 2 samples (n: {self.n})"
            )
        if self.shots != "none" and self.shots_dir is None:
            raise ValueError(f"system '{self.name}': shots {self.shots} needs shots_dir")
        return self

    def system_names(self) -> list[str]:
        if self.n == 1 or self.rerank != "none":  # a reranked system is one candidate
            return [self.name]
        return [f"{self.name}-{k}" for k in range(1, self.n + 1)]

    def reranking_metric(self) -> str:
        return self.rerank_metric or ("chrf" if self.rerank == "mbr" else "consensus_chrf")


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
