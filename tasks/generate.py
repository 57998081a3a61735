"""Stage 2, generate: candidate translations of the training sources -> candidates/<system>.parquet.

A system is a decoding of the policy model (transformers or vLLM), an OpenAI-compatible endpoint, or another
system's translations from a file. Prompts over the limit are skipped and counted, never cut.

Model and endpoint generations go through the content-addressed generation cache (models/generate/cache.py,
`<run.root>/_cache/generations.sqlite`): a rerun on grown data generates only the new segments, a killed stage
keeps every finished batch, and a sampled segment's seeds come from its id, not from its place in a batch.
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
from alma_r.models.generate.cache import GenerationCache, SystemGenerations, decoding_settings
from alma_r.models.generate.hf_backend import Decoding, generate_translations, sample_translations
from alma_r.models.generate.vllm_backend import DEFAULT_DTYPE as VLLM_DTYPE
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
    """The policy loaded once, on first use, for every transformers system of the stage (its tokenizer alone for
    vLLM, and to measure prompts)."""

    def __init__(self, cfg: RunConfig, model_path: str, adapter: str | None):
        self.cfg, self.model_path, self.adapter = cfg, model_path, adapter
        self._tokenizer = None
        self._model = None

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
        return self._tokenizer

    def get(self):
        if self._model is None:
            self._model = load_model(
                self.model_path,
                adapter=self.adapter,
                dtype=self.cfg.model.dtype,
                trust_remote_code=self.cfg.model.trust_remote_code,
                device=pick_device(),
            )
        return self._model, self.tokenizer()


def generation_cache_path(cfg: RunConfig) -> Path:
    """The generation cache of every run under `run.root`, beside the score cache."""
    return (Path(cfg.run.root) / "_cache" / "generations.sqlite").resolve()


# Prompts per vLLM job: the worker hands each finished job back (and it is cached) while the next one runs.
VLLM_JOB_PROMPTS = 2048


def endpoint_translations(
    cfg: RunConfig, system: DecodingConfig, prompts: list[str], sources: list[dict], cache: GenerationCache
) -> tuple[SystemGenerations, dict]:
    from alma_r.models.generate.openai_backend import translate_via_endpoint
    from alma_r.tasks.shared.endpoints import endpoint_config

    endpoint = endpoint_config(system.endpoint)  # the key resolved here: the backend takes a plain string
    sampling = dict(
        max_tokens=system.max_new_tokens,
        temperature=system.temperature if system.do_sample else 0.0,
        top_p=system.top_p,
    )
    identity = {"base_url": endpoint.base_url, "model": endpoint.model, "api": endpoint.api}
    # Every request carries its segment's seed (an endpoint may sample even at temperature 0).
    plan = SystemGenerations(
        cache, identity, "openai", sampling, prompts, ids_of(sources), system.n, cfg.run.seed, True, None
    )
    todo = plan.missing()
    if todo:
        translate_via_endpoint(
            endpoint,
            [prompts[i] for i, _ in todo],
            Path(cfg.run.root).resolve() / "_cache" / "requests.sqlite",
            on_result=lambda j, text: plan.record([(*todo[j], text)]),
            seeds=[plan.seeds[i][k] for i, k in todo],
            **sampling,
        )
    return plan, {"model_id": f"{endpoint.base_url}#{endpoint.model}", "adapter": None}


def policy_translations(
    cfg: RunConfig,
    system: DecodingConfig,
    prompts: list[str],
    sources: list[dict],
    policy: PolicyModel,
    cache: GenerationCache,
) -> SystemGenerations:
    """The policy's n translations per prompt, from the cache where it has them; the rest generated and cached
    batch by batch. A sampled segment's sample k has the seed segment_seed(run.seed, segment id, k)."""
    decoding = system_decoding(system)
    limit = cfg.generate.max_prompt_tokens
    vllm = system.backend == "vllm"
    dtype = VLLM_DTYPE if vllm else cfg.model.dtype
    settings = decoding_settings(decoding)
    if vllm:  # the parallel layout changes the kernels' sums; vLLM ranks beams as transformers does
        settings.update(tensor_parallel_size=system.tensor_parallel_size, length_normalization="generated")
    plan = SystemGenerations(
        cache,
        cache.model_fingerprint(policy.model_path, policy.adapter, dtype),
        system.backend,
        settings,
        prompts,
        ids_of(sources),
        system.n,
        cfg.run.seed,
        decoding.do_sample,
        limit,
    )
    if not plan.missing():
        return plan  # nothing to generate: neither model nor tokenizer is loaded
    tokenizer = policy.tokenizer()
    plan.measure(
        {i: len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in plan.missing_prompts()}
    )
    todo = plan.missing_prompts()
    if not todo:
        return plan
    desc = f"generate {system.name}"
    if vllm:
        vllm_translations(cfg, system, decoding, prompts, policy, plan, todo)
    elif decoding.do_sample:
        model, _ = policy.get()
        order = list(todo)
        sample_translations(
            model,
            tokenizer,
            [prompts[i] for i in order],
            [[plan.seeds[i][k] for k in todo[i]] for i in order],
            decoding,
            limit,
            desc=desc,
            on_prompt=lambda j, texts: plan.record(
                (order[j], k, t) for k, t in zip(todo[order[j]], texts, strict=True)
            ),
        )
    else:  # greedy or beam: one pass gives every sample k of a prompt (n > 1 only makes sense with sampling)
        model, _ = policy.get()
        order = list(todo)
        generate_translations(
            model,
            tokenizer,
            [prompts[i] for i in order],
            decoding,
            cfg.generate.batch_size,
            limit,
            desc=desc,
            on_batch=lambda idx, texts: plan.record(
                (order[j], k, text) for j, text in zip(idx, texts, strict=True) for k in todo[order[j]]
            ),
        )
    return plan


def vllm_translations(
    cfg: RunConfig,
    system: DecodingConfig,
    decoding: Decoding,
    prompts: list[str],
    policy: PolicyModel,
    plan: SystemGenerations,
    todo: dict[int, list[int]],
) -> None:
    """The missing generations with vLLM, one worker call, in jobs of VLLM_JOB_PROMPTS prompts cached as each
    finishes. Samples are requests of one sample each with their own seed; greedy and beam search ask n
    outputs of one request (beam search's n best)."""
    from alma_r.models.generate.vllm_backend import VllmJob, generate_jobs_with_vllm

    if decoding.do_sample:
        wanted = [(i, k) for i, ks in todo.items() for k in ks]
        n, seeds = 1, tuple(plan.seeds[i][k] for i, k in wanted)
    else:
        wanted = [(i, None) for i in todo]
        n, seeds = system.n, None
    blocks = [
        range(s, min(s + VLLM_JOB_PROMPTS, len(wanted))) for s in range(0, len(wanted), VLLM_JOB_PROMPTS)
    ]
    jobs = [VllmJob(decoding, n=n, seed=cfg.run.seed, prompts=tuple(b), seeds=seeds) for b in blocks]

    def cache_job(j: int, outputs: list[list[str] | None]) -> None:
        done = []
        for place, texts in zip(blocks[j], outputs, strict=True):
            i, k = wanted[place]
            if texts is not None:
                done += [(i, k, texts[0])] if k is not None else [(i, k2, texts[k2]) for k2 in todo[i]]
        plan.record(done)

    generate_jobs_with_vllm(
        str(resolve_path(system.vllm_python, Path.cwd())),
        policy.model_path,
        policy.adapter,
        [prompts[i] for i, _ in wanted],
        jobs,
        cfg.generate.max_prompt_tokens,
        policy.tokenizer(),
        dtype=VLLM_DTYPE,
        tensor_parallel_size=system.tensor_parallel_size,
        on_job=cache_job,
    )


def ids_of(sources: list[dict]) -> list[str]:
    return [r["id"] for r in sources]


def run_generate(
    cfg: RunConfig, segments_path: Path, model_path: str, adapter: str | None, out_dir: Path
) -> tuple[dict, dict]:
    """Every system's candidates. Policy and endpoint generations come from the generation cache where an
    earlier run made them; counts `<system>/generated` and `<system>/from_cache` per candidate table (and their
    totals) say which, `<system>/skipped_prompt_too_long` the rest."""
    all_segments = read_rows(segments_path, SEGMENTS)
    sources = preference_sources(all_segments, cfg.generate.max_sources_per_lp)
    policy = PolicyModel(cfg, model_path, adapter)
    cached = any(s.backend != "file" for s in cfg.generate.systems)  # files alone need no cache
    cache = GenerationCache(generation_cache_path(cfg)) if cached else None
    outputs, counts = {}, {"sources": len(sources), "generated": 0, "from_cache": 0}
    for system in cfg.generate.systems:
        prompts = system_prompts(cfg, system, sources)
        if system.backend == "file":  # read, not generated: nothing to cache
            texts = file_translations(cfg, system, sources, all_segments)
            outs, generated, from_cache = [[t] for t in texts], [len(texts)], [0]
            identity = {"model_id": f"file:{','.join(sorted(system.files.values()))}", "adapter": None}
        else:
            if system.backend == "openai":
                plan, identity = endpoint_translations(cfg, system, prompts, sources, cache)
            else:
                plan = policy_translations(cfg, system, prompts, sources, policy, cache)
                identity = model_identity(policy.model_path, policy.adapter)
            outs, generated, from_cache = plan.results(), plan.generated, plan.from_cache
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
                if o[k] is not None
            ]
            write_candidates(name, rows, len(sources), out_dir, outputs, counts)
            counts[f"{name}/generated"], counts[f"{name}/from_cache"] = generated[k], from_cache[k]
            counts["generated"] += generated[k]
            counts["from_cache"] += from_cache[k]
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
