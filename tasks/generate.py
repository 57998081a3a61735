"""Stage 2, generate: candidate translations of the training sources -> candidates/<system>.parquet.

A system is a decoding of the policy model (transformers or vLLM), an OpenAI-compatible endpoint, another
system's translations from a file, or translations an ingest source carried. Which sources are too long is
decided once, before any system runs (`skip_list`), and every system translates the same kept sources: the
score stage wants every system to cover the same segments, and a source one system skipped but another
translated would stop it. Long prompts are skipped and counted per direction, never cut.

Model and endpoint generations go through the content-addressed generation cache (models/generate/cache.py,
`<run.root>/_cache/generations.sqlite`): a rerun on grown data generates only the new segments, a killed stage
keeps every finished batch, and a sampled segment's seeds come from its id, not from its place in a batch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

from alma_r.config import DecodingConfig, RunConfig, config_base_dir, resolve_path
from alma_r.data.io import read_rows
from alma_r.data.schemas import INGESTED_TRANSLATIONS, SEGMENTS
from alma_r.models.generate.cache import (
    Generation,
    GenerationCache,
    SystemGenerations,
    decoding_settings,
    generation_key,
)
from alma_r.models.generate.hf_backend import Decoding, generate_translations, sample_translations
from alma_r.models.generate.vllm_backend import DEFAULT_DTYPE as VLLM_DTYPE
from alma_r.models.loading import load_model, load_tokenizer, model_identity, pick_device
from alma_r.models.prompts import load_shots, make_prompt
from alma_r.models.score.cache import ScoreCache
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.shared.candidates import write_candidates
from alma_r.tasks.shared.imported_translations import file_translations, ingested_translations
from alma_r.tasks.shared.quality_decoding import rerank
from alma_r.tasks.shared.scoring import LanguageScorers, cache_path_for


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


# The systems that decode with the policy model: their prompts are what the prompt limit protects.
POLICY_BACKENDS = ("hf", "vllm")
# The "backend" of the prompt lengths kept in the generation cache: no generation has it, so no key collides.
PROMPT_TOKENS = "prompt_tokens"


def prompt_lengths(prompts: Iterable[str], policy: PolicyModel, cache: GenerationCache) -> dict[str, int]:
    """Each prompt's length in the policy tokenizer's tokens, without special tokens (as every backend counts
    it). Kept in the generation cache by tokenizer and prompt, so that a rerun decides its skip list without
    loading the tokenizer (a cached generation loads nothing)."""
    distinct = list(dict.fromkeys(prompts))
    # The base model's part of its fingerprint covers its tokenizer files; dtype and adapter change no length.
    tokenizer = {
        "tokenizer": cache.model_fingerprint(policy.model_path, None, policy.cfg.model.dtype)["model"]
    }
    keys = {p: generation_key(tokenizer, PROMPT_TOKENS, p, {}, 0, None) for p in distinct}
    found = cache.get_many(list(keys.values()))
    lengths = {p: found[key].prompt_tokens for p, key in keys.items() if key in found}
    todo = [p for p in distinct if p not in lengths]
    if todo:
        measure = policy.tokenizer()
        new = {p: len(measure(p, add_special_tokens=False)["input_ids"]) for p in todo}
        cache.put_many({keys[p]: Generation(None, n) for p, n in new.items()})
        lengths.update(new)
    return lengths


def skip_list(
    cfg: RunConfig, sources: list[dict], policy: PolicyModel, cache: GenerationCache
) -> tuple[list[int], dict[str, list[int]], dict[str, int]]:
    """The places of the sources every system translates, each policy system's prompt lengths for them, and
    the sources skipped per direction.

    A source is kept when every prompt the policy model would be given for it fits `generate.max_prompt_tokens`:
    the zero-shot prompt (the one CPO trains on, used even when no system decodes with the policy) and the
    prompt of each hf/vllm system, whose shots make it the longest. Deciding by the zero-shot prompt alone would
    hand a 5-shot system prompts over the limit, which it must skip (the lists part again) or cut. An endpoint's
    prompts count only through the zero-shot one: the limit is the policy's context, and its tokenizer says
    nothing about the endpoint's."""
    limit = cfg.generate.max_prompt_tokens
    prompts = {
        s.name: system_prompts(cfg, s, sources) for s in cfg.generate.systems if s.backend in POLICY_BACKENDS
    }
    zero_shot = [make_prompt(r["src"], r["src_lang"], r["tgt_lang"]) for r in sources]
    lengths = prompt_lengths([*zero_shot, *(p for ps in prompts.values() for p in ps)], policy, cache)
    kept, skipped = [], Counter({r["lp"]: 0 for r in sources})
    for i, r in enumerate(sources):
        if max([lengths[zero_shot[i]], *(lengths[ps[i]] for ps in prompts.values())]) <= limit:
            kept.append(i)
        else:
            skipped[r["lp"]] += 1
    by_system = {name: [lengths[ps[i]] for i in kept] for name, ps in prompts.items()}
    return kept, by_system, dict(skipped)


# The config fields a policy-model decoding takes: Decoding's fields are DecodingConfig's, by name.
DECODING_FIELDS = frozenset(f.name for f in fields(Decoding))


def system_decoding(system: DecodingConfig) -> Decoding:
    return Decoding(**system.model_dump(include=DECODING_FIELDS))


def generation_settings(system: DecodingConfig, seed: int) -> str:
    """The CANDIDATES `generation` column: JSON of the system's decoding settings, backend, samples and shots,
    and the run's seed."""
    settings = system.model_dump(include={*DECODING_FIELDS, "backend", "n", "shots"})
    if system.rerank != "none":
        settings.update(rerank=system.rerank, rerank_metric=system.reranking_metric())
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
    lengths: list[int],
    sources: list[dict],
    policy: PolicyModel,
    cache: GenerationCache,
) -> SystemGenerations:
    """The policy's n translations per prompt (each within the limit: the skip list's, with its `lengths`),
    from the cache where it has them; the rest generated and cached batch by batch. A sampled segment's sample k
    has the seed segment_seed(run.seed, segment id, k)."""
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
    plan.measure({i: lengths[i] for i in plan.missing_prompts()})  # the lengths go into the cache's entries
    todo = plan.missing_prompts()
    desc = f"generate {system.name}"
    if vllm:
        vllm_translations(cfg, system, decoding, prompts, policy, plan, todo)
    elif decoding.do_sample:
        model, tokenizer = policy.get()
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
        model, tokenizer = policy.get()
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
    cfg: RunConfig,
    segments_path: Path,
    model_path: str,
    adapter: str | None,
    out_dir: Path,
    ingested_path: Path | None = None,
) -> tuple[dict, dict]:
    """Every system's candidates for the kept sources (`skip_list`). Policy and endpoint generations come from
    the generation cache where an earlier run made them; counts `<system>/generated` and `<system>/from_cache`
    per candidate table (and their totals) say which. `skipped_prompt_too_long/<lp>` (and its total
    `skipped_prompt_too_long`) counts the sources no system translated; `<system>/skipped_prompt_too_long` is
    that total for each table. `ingested_path`: the ingest stage's ingested_translations, when it has one."""
    all_segments = read_rows(segments_path, SEGMENTS)
    candidates = preference_sources(all_segments, cfg.generate.max_sources_per_lp)
    policy = PolicyModel(cfg, model_path, adapter)
    cache = GenerationCache(generation_cache_path(cfg))  # also holds the prompt lengths of the skip list
    kept, lengths, skipped = skip_list(cfg, candidates, policy, cache)
    sources = [candidates[i] for i in kept]
    ingested = None  # read once, for the first ingested system
    outputs = {}
    counts = {
        "sources": len(candidates),
        "skipped_prompt_too_long": len(candidates) - len(sources),
        **{f"skipped_prompt_too_long/{lp}": n for lp, n in skipped.items()},
        "generated": 0,
        "from_cache": 0,
    }
    for system in cfg.generate.systems:
        settings = generation_settings(system, cfg.run.seed)
        if system.backend == "file":  # read, not generated: nothing to cache (nor for ingested)
            texts = file_translations(cfg, system, sources, all_segments)
            model_id = f"file:{','.join(sorted(system.files.values()))}"
            rows_of = [{"model_id": model_id, "adapter": None, "generation": settings}] * len(sources)
            outs, generated, from_cache = [[t] for t in texts], [len(texts)], [0]
        elif system.backend == "ingested":
            if ingested is None:
                ingested = read_rows(ingested_path, INGESTED_TRANSLATIONS) if ingested_path else []
            found = ingested_translations(system, sources, ingested)
            rows_of = [
                {
                    "model_id": r["origin"],
                    "adapter": None,
                    "generation": json.dumps({"backend": "ingested", "origin": r["origin"]}, sort_keys=True),
                }
                for r in found
            ]
            outs, generated, from_cache = [[r["hypothesis"]] for r in found], [len(found)], [0]
        else:
            prompts = system_prompts(cfg, system, sources)
            if system.backend == "openai":
                plan, identity = endpoint_translations(cfg, system, prompts, sources, cache)
            else:
                plan = policy_translations(cfg, system, prompts, lengths[system.name], sources, policy, cache)
                identity = model_identity(policy.model_path, policy.adapter)
            outs, generated, from_cache = plan.results(), plan.generated, plan.from_cache
            if any(o is None for row in outs for o in row):  # the one list would part: score would stop
                raise RuntimeError(f"system '{system.name}': a prompt the skip list kept was skipped")
            if system.rerank != "none":  # the n samples reranked into one candidate
                outs, generated, from_cache = (
                    reranked(cfg, system, sources, outs, counts),
                    [sum(generated)],
                    [sum(from_cache)],
                )
            rows_of = [{**identity, "generation": settings}] * len(sources)
        for k, name in enumerate(system.system_names()):
            rows = [
                {"segment_id": r["id"], "lp": r["lp"], "system": name, "hypothesis": o[k], **meta}
                for r, o, meta in zip(sources, outs, rows_of, strict=True)
            ]
            write_candidates(name, rows, len(candidates), out_dir, outputs, counts)
            counts[f"{name}/generated"], counts[f"{name}/from_cache"] = generated[k], from_cache[k]
            counts["generated"] += generated[k]
            counts["from_cache"] += from_cache[k]
    return outputs, counts


def reranked(
    cfg: RunConfig, system: DecodingConfig, sources: list[dict], outs: list[list[str]], counts: dict
) -> list[list[str]]:
    """Each source's n samples reduced to one by QE reranking or MBR (tasks/shared/quality_decoding.py)."""
    metric = system.reranking_metric()
    scorer_for, cache = LanguageScorers(cfg, metric), ScoreCache(cache_path_for(cfg))
    chosen = rerank(sources, outs, system.rerank, scorer_for, metric, cache, counts)
    return [[c] for c in chosen]


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
    """Translate the preference sources with every configured system. `segments` is the ingest stage's result:
    its segments and, when a source carried translations, its ingested_translations (covered by the key through
    the ingest key, which is upstream)."""
    ingested = segments.outputs.get("ingested_translations")
    return run_stage(
        generate_key(cfg, run_dir, segments, policy),
        lambda out: run_generate(
            cfg,
            segments.path("segments"),
            policy.outputs["model"],
            policy.outputs.get("adapter"),
            out,
            Path(ingested) if ingested else None,
        ),
    )


generate_task = stage_task(generate_stage, generate_key, gpu=True)
