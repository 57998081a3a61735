"""Stage 2, generate: candidate translations of the training sources -> candidates/<system>.parquet.

A system is a decoding of the policy model (transformers or vLLM), an OpenAI-compatible endpoint, or another
system's translations from a file. Prompts over the limit are skipped and counted, never cut.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import fields
from pathlib import Path

from alma_r.config import DecodingConfig, RunConfig, config_base_dir, resolve_path
from alma_r.data.io import read_rows
from alma_r.data.readers import IngestError, read_lines
from alma_r.data.schemas import SEGMENTS
from alma_r.models.generate.hf_backend import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer, model_identity, pick_device
from alma_r.models.prompts import load_shots, make_prompt
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.candidates import write_candidates


def preference_sources(segments: list[dict], max_per_lp: int | None) -> list[dict]:
    """The training segments candidates are generated for: the first N per direction, in file order."""
    taken: Counter[str] = Counter()
    out = []
    for row in segments:
        if row["split"] != "train" or not row["ref"]:
            continue
        if max_per_lp is not None and taken[row["lp"]] >= max_per_lp:
            continue
        taken[row["lp"]] += 1
        out.append(row)
    return out


def system_prompts(cfg: RunConfig, system: DecodingConfig, sources: list[dict]) -> list[str]:
    shots: dict[tuple[str, str], list[dict]] = {}
    if system.shots != "none":
        folder = resolve_path(system.shots_dir, config_base_dir(cfg))
        for r in sources:
            key = (r["src_lang"], r["tgt_lang"])
            if key not in shots:
                shots[key] = load_shots(folder, *key)
    return [
        make_prompt(r["src"], r["src_lang"], r["tgt_lang"], shots.get((r["src_lang"], r["tgt_lang"])))
        for r in sources
    ]


def file_translations(
    cfg: RunConfig, system: DecodingConfig, sources: list[dict], all_segments: list[dict]
) -> list[str]:
    """Another system's translations, one per training source of its direction in file order (checked)."""
    by_lp: dict[str, list[str]] = defaultdict(list)
    for r in all_segments:
        if r["split"] == "train" and r["ref"]:
            by_lp[r["lp"]].append(r["id"])
    text: dict[str, str] = {}
    for lp, file in system.files.items():
        path = resolve_path(file, config_base_dir(cfg))
        lines = read_lines(path)
        if system.file_format == "jsonl":
            values = []
            for i, line in enumerate(lines, start=1):
                try:
                    values.append(json.loads(line)[system.jsonl_field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise IngestError(
                        f"{path}:{i}: no field '{system.jsonl_field}' in a JSON object"
                    ) from None
            lines = values
        ids = by_lp.get(lp, [])
        if len(lines) != len(ids):
            raise IngestError(
                f"{path}:{min(len(lines), len(ids)) + 1}: {len(lines)} translations for the "
                f"{len(ids)} training sources of {lp} (system '{system.name}')"
            )
        text.update(zip(ids, lines, strict=True))
    missing = [r["id"] for r in sources if r["id"] not in text]
    if missing:
        raise IngestError(f"system '{system.name}': no file for the direction of {missing[:3]}")
    return [text[r["id"]] for r in sources]


# The config fields a policy-model decoding takes: Decoding's fields are DecodingConfig's, by name.
DECODING_FIELDS = frozenset(f.name for f in fields(Decoding))


def system_decoding(system: DecodingConfig) -> Decoding:
    return Decoding(**system.model_dump(include=DECODING_FIELDS))


def generation_settings(system: DecodingConfig, seed: int) -> str:
    """The CANDIDATES `generation` column: JSON of the system's decoding settings, backend, samples and shots,
    and the run's seed."""
    settings = system.model_dump(include={*DECODING_FIELDS, "backend", "n", "shots"})
    return json.dumps({**settings, "seed": seed}, sort_keys=True)


class PolicyModel:
    """The policy loaded once, on first use, for every transformers system of the stage."""

    def __init__(self, cfg: RunConfig, model_path: str, adapter: str | None):
        self.cfg, self.model_path, self.adapter = cfg, model_path, adapter
        self._loaded = None

    def get(self):
        if self._loaded is None:
            tokenizer = load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
            model = load_model(
                self.model_path,
                adapter=self.adapter,
                dtype=self.cfg.model.dtype,
                trust_remote_code=self.cfg.model.trust_remote_code,
                device=pick_device(),
            )
            self._loaded = (model, tokenizer)
        return self._loaded


def translate(
    cfg: RunConfig,
    system: DecodingConfig,
    prompts: list[str],
    sources: list[dict],
    all_segments: list[dict],
    policy: PolicyModel,
) -> tuple[list[list[str | None]], dict]:
    """n translations per prompt (None where the prompt is over the limit) and the backend's identity."""
    decoding = system_decoding(system)
    seed = cfg.run.seed
    if system.backend == "file":
        return [[t] for t in file_translations(cfg, system, sources, all_segments)], {
            "model_id": f"file:{','.join(sorted(system.files.values()))}",
            "adapter": None,
        }
    if system.backend == "openai":
        from alma_r.models.generate.openai_backend import translate_via_endpoint
        from alma_r.tasks.shared.endpoints import endpoint_config

        endpoint = endpoint_config(system.endpoint)  # the key resolved here: the backend takes a plain string
        cache = Path(cfg.run.root).resolve() / "_cache" / "requests.sqlite"
        outs = [
            translate_via_endpoint(
                endpoint,
                prompts,
                cache,
                max_tokens=system.max_new_tokens,
                temperature=system.temperature if system.do_sample else 0.0,
                top_p=system.top_p,
                seed=seed + k,
            )[0]
            for k in range(system.n)
        ]
        return [list(x) for x in zip(*outs, strict=True)], {
            "model_id": f"{endpoint.base_url}#{endpoint.model}",
            "adapter": None,
        }
    model, tokenizer = policy.get()
    identity = model_identity(policy.model_path, policy.adapter)
    if system.backend == "vllm":
        from alma_r.models.generate.vllm_backend import generate_with_vllm

        python = str(resolve_path(system.vllm_python, Path.cwd()))
        outs = generate_with_vllm(
            python,
            policy.model_path,
            policy.adapter,
            prompts,
            decoding,
            system.n,
            seed,
            cfg.generate.max_prompt_tokens,
            tokenizer,
            tensor_parallel_size=system.tensor_parallel_size,
        )
        return outs, identity
    # transformers: n samples are n seeded passes (n > 1 only makes sense with sampling)
    runs = [
        generate_translations(
            model,
            tokenizer,
            prompts,
            decoding,
            cfg.generate.batch_size,
            cfg.generate.max_prompt_tokens,
            seed=seed + k,
            desc=f"generate {system.name}",
        )
        for k in range(system.n)
    ]
    return [None if x[0] is None else list(x) for x in zip(*runs, strict=True)], identity


def run_generate(
    cfg: RunConfig, segments_path: Path, model_path: str, adapter: str | None, out_dir: Path
) -> tuple[dict, dict]:
    all_segments = read_rows(segments_path, SEGMENTS)
    sources = preference_sources(all_segments, cfg.generate.max_sources_per_lp)
    policy = PolicyModel(cfg, model_path, adapter)
    outputs, counts = {}, {"sources": len(sources)}
    for system in cfg.generate.systems:
        prompts = system_prompts(cfg, system, sources)
        outs, identity = translate(cfg, system, prompts, sources, all_segments, policy)
        settings = generation_settings(system, cfg.run.seed)
        for k, name in enumerate(system.system_names()):
            rows = [
                {
                    "segment_id": r["id"],
                    "lp": r["lp"],
                    "system": name,
                    "hypothesis": o[k],
                    **identity,
                    "generation": settings,
                }
                for r, o in zip(sources, outs, strict=True)
                if o is not None
            ]
            write_candidates(name, rows, len(sources), out_dir, outputs, counts)
    return outputs, counts


def generate_key(cfg: RunConfig, run_dir: Path, segments: StageResult, policy: StageResult) -> StageKey:
    files = [
        resolve_path(f, config_base_dir(cfg)) for s in cfg.generate.systems for f in (s.files or {}).values()
    ]
    key = stage_key(
        "generate",
        cfg.section_hash("generate", "model"),
        [segments, policy],
        files=files,
        extra=cfg.run.seed,
        module=__name__,
    )
    return StageKey("generate", Path(run_dir) / "generate", key)


def generate_stage(cfg: RunConfig, run_dir: Path, segments: StageResult, policy: StageResult) -> StageResult:
    """Translate the preference sources with every configured system."""
    return run_stage(
        generate_key(cfg, run_dir, segments, policy),
        lambda out: run_generate(
            cfg, segments.path("segments"), policy.outputs["model"], policy.outputs.get("adapter"), out
        ),
    )


generate_task = stage_task(generate_stage, generate_key, gpu=True)
