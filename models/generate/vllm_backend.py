"""Generation with vLLM, run in its own environment and process (no vllm import here).

vLLM pins its own torch and needs transformers>=5.16, which the main environment (transformers 4.57, held there
by unbabel-comet) cannot hold: `make vllm-env` builds .venv-vllm, and each call here runs
`models/generate/vllm_worker.py` once with that environment's python, for any number of decodings (jobs) of the
same prompts, so the engine starts once.

Both backends see the same tokens: prompts are tokenized here with the model's HF tokenizer exactly as
`generation.generate_translations` does (ALMA's convention, no BOS), a prompt longer than `max_prompt_tokens`
is skipped (None, counted by the caller), never cut, and the generated token ids are decoded here with the same
tokenizer before ALMA's post-processing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from alma_r.models.generate.hf_backend import Decoding
from alma_r.models.prompts import postprocess

WORKER = Path(__file__).resolve().with_name("vllm_worker.py")
MAKE_TARGET = "make vllm-env"
# The checkout's environment (this file is <repo>/models/generate/vllm_backend.py); ALMA_R_VLLM_PYTHON points
# elsewhere.
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
# Variables that would make the vLLM python import the main environment's packages.
_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


def default_vllm_python() -> str:
    return os.environ.get("ALMA_R_VLLM_PYTHON") or str(DEFAULT_VLLM_PYTHON)


@dataclass(frozen=True)
class VllmJob:
    """One decoding of every prompt: n outputs each; `use_adapter=False` runs it on the base model."""

    decoding: Decoding
    n: int = 1
    seed: int = 0
    use_adapter: bool = True
    # Beam search only: "generated" ranks finished beams as transformers does (log-prob / generated length),
    # "total" as vLLM does (log-prob / prompt+generated length, which favours short outputs).
    length_normalization: str = "generated"


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt `index` (its place in the caller's list, so skipped prompts shift nothing).

    One seed for every prompt would draw the same random numbers for each of them (near-identical samples from
    similar prompts); vLLM seeds a request's n samples seed, seed+1, ..., so seeds are hashed apart: no two
    samples share a stream, within a call or between calls with neighbouring seeds.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2  # below 2**62: room for the +j of the n samples


def _job_spec(job: VllmJob, ids: list[list[int]], indices: list[int]) -> dict:
    d = job.decoding
    if job.n < 1:
        raise ValueError(f"n must be at least 1, got {job.n}")
    spec: dict = {"prompts": ids, "n": job.n, "max_tokens": d.max_new_tokens, "use_adapter": job.use_adapter}
    if d.num_beams > 1:
        if d.do_sample:
            raise ValueError("vLLM has no beam sampling (num_beams > 1 with do_sample)")
        if job.n > d.num_beams:
            raise ValueError(f"n={job.n} outputs asked of a beam search with num_beams={d.num_beams}")
        if job.length_normalization not in ("generated", "total"):
            raise ValueError(
                f"length_normalization '{job.length_normalization}' is not 'generated' or 'total'"
            )
        spec.update(beam_width=d.num_beams, temperature=0.0, length_normalization=job.length_normalization)
    elif d.do_sample:
        spec.update(
            temperature=d.temperature,
            top_p=d.top_p,
            top_k=d.top_k,
            seeds=[prompt_seed(job.seed, i) for i in indices],
        )
    else:
        spec.update(temperature=0.0, seed=job.seed)
    return spec


def _check_python(python: str) -> None:
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        raise FileNotFoundError(
            f"the vLLM environment's python {python} does not exist: vLLM needs its own environment "
            f"(its torch and transformers>=5.16 pins clash with the main one); build it with `{MAKE_TARGET}`"
        )


def run_worker(
    python: str,
    request: dict,
    timeout: float | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """Run the worker on one request; its output lines (one per job), in job order.

    `env` adds variables to the worker's environment (e.g. VLLM_CACHE_ROOT, OMP_NUM_THREADS); the worker's
    log (vLLM's own) goes to `log_path` when given, and its tail into the error when the worker fails.
    """
    _check_python(python)
    worker_env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    worker_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    worker_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="alma-r-vllm-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "outputs.jsonl"
        req_path.write_text(json.dumps(request), encoding="utf-8")
        log = Path(log_path) if log_path is not None else Path(tmp) / "worker.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [python, str(WORKER), str(req_path), str(out_path)]
        t0 = time.perf_counter()
        with open(log, "w", encoding="utf-8") as fh:
            try:
                proc = subprocess.run(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, env=worker_env, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"the vLLM worker ran past {timeout}s; its log: {log}") from exc
        if proc.returncode != 0 or not out_path.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(
                f"the vLLM worker failed (exit code {proc.returncode}): {' '.join(cmd)}\n{tail}"
            )
        lines = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines() if line]
    print(f"[vllm] {len(lines)} job(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    lines.sort(key=lambda r: r["job"])
    if [r["job"] for r in lines] != list(range(len(request["jobs"]))):
        raise RuntimeError(
            f"the vLLM worker answered jobs {[r['job'] for r in lines]} of {len(request['jobs'])}"
        )
    return lines


def generate_jobs_with_vllm(
    python: str,
    model: str,
    adapter: str | None,
    prompts: list[str],
    jobs: list[VllmJob],
    max_prompt_tokens: int,
    tokenizer,
    *,
    dtype: str = "float32",
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    engine_args: dict | None = None,
    trust_remote_code: bool = False,
    timeout: float | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    raw: bool = False,
) -> list[list[list[str] | None]]:
    """Per job, per prompt: its n post-processed translations, or None for a prompt over `max_prompt_tokens`.

    One engine start serves every job. `max_model_len` defaults to `max_prompt_tokens` plus the largest
    `max_new_tokens`: every kept prompt fits with its whole generation, and the engine sizes its batches and
    KV cache for that rather than for the model's full context. `raw=True` returns the decoded texts before
    ALMA's post-processing.
    """
    _check_python(python)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    todo = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_tokens]
    ids = [encoded[i] for i in todo]
    request = {
        "model": str(model),
        "adapter": str(adapter) if adapter is not None else None,
        "dtype": dtype,
        "seed": jobs[0].seed if jobs else 0,
        "tensor_parallel_size": tensor_parallel_size,
        "max_model_len": max_model_len
        or max_prompt_tokens + max((job.decoding.max_new_tokens for job in jobs), default=0),
        "kv_cache_memory_bytes": kv_cache_memory_bytes,
        "trust_remote_code": trust_remote_code,
        "engine_args": engine_args or {},
        "jobs": [_job_spec(job, ids, todo) for job in jobs],
    }
    lines = run_worker(python, request, timeout=timeout, log_path=log_path, env=env)
    results: list[list[list[str] | None]] = []
    for job, line in zip(jobs, lines, strict=True):
        per_prompt: list[list[str] | None] = [None] * len(prompts)
        if len(line["outputs"]) != len(todo):
            raise RuntimeError(f"the vLLM worker answered {len(line['outputs'])} of {len(todo)} prompts")
        for i, entry in zip(todo, line["outputs"], strict=True):
            # Decoded here, by the tokenizer the transformers backend uses, as it decodes its new tokens.
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in entry["token_ids"]]
            if len(texts) != job.n:
                raise RuntimeError(f"the vLLM worker returned {len(texts)} outputs for n={job.n}")
            per_prompt[i] = texts if raw else [postprocess(t) for t in texts]
        results.append(per_prompt)
    return results


def generate_with_vllm(
    python: str,
    model: str,
    adapter: str | None,
    prompts: list[str],
    decoding: Decoding,
    n: int,
    seed: int,
    max_prompt_tokens: int,
    tokenizer,
    **engine,
) -> list[list[str] | None]:
    """Per prompt: its n post-processed translations, or None where the prompt exceeds `max_prompt_tokens`."""
    job = VllmJob(decoding=decoding, n=n, seed=seed)
    return generate_jobs_with_vllm(
        python, model, adapter, prompts, [job], max_prompt_tokens, tokenizer, **engine
    )[0]
