"""Generation with vLLM, run in its own environment and process (no vllm import here).

vLLM pins its own torch and needs transformers>=5.16, which the main environment (transformers 4.57, held there
by unbabel-comet) cannot hold: `make vllm-env` builds .venv-vllm, and each call here runs
`models/generate/vllm_worker.py` once with that environment's python, for any number of decodings (jobs) of the
same prompts, so the engine starts once.

Both backends see the same tokens: prompts are tokenized here with the model's HF tokenizer exactly as
`generation.generate_translations` does (ALMA's convention, no BOS), a prompt longer than `max_prompt_tokens`
is skipped (None, counted by the caller), never cut, and the generated token ids are decoded here with the same
tokenizer before ALMA's post-processing.

A sampled prompt's seed is given by the caller (the generate stage derives it from the segment's id, see
cache.segment_seed), so its samples do not depend on the other prompts of the call or their order. The worker
appends each job's output as the job finishes: `on_job` hands it over while later jobs still run, so a crash
loses only the job under way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alma_r.models.generate.cache import segment_seed
from alma_r.models.generate.hf_backend import Decoding
from alma_r.models.prompts import postprocess

WORKER = Path(__file__).resolve().with_name("vllm_worker.py")
MAKE_TARGET = "make vllm-env"
# The checkout's environment (this file is <repo>/models/generate/vllm_backend.py); ALMA_R_VLLM_PYTHON points
# elsewhere.
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
# Variables that would make the vLLM python import the main environment's packages.
_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
DEFAULT_DTYPE = "float32"  # the engine's dtype unless the caller names one
POLL_S = 1.0  # how often a running worker's finished jobs are read


def default_vllm_python() -> str:
    return os.environ.get("ALMA_R_VLLM_PYTHON") or str(DEFAULT_VLLM_PYTHON)


@dataclass(frozen=True)
class VllmJob:
    """One decoding of the call's prompts (or of those `prompts` names, by place): n outputs each;
    `use_adapter=False` runs it on the base model."""

    decoding: Decoding
    n: int = 1
    seed: int = 0
    use_adapter: bool = True
    # Beam search only: "generated" ranks finished beams as transformers does (log-prob / generated length),
    # "total" as vLLM does (log-prob / prompt+generated length, which favours short outputs).
    length_normalization: str = "generated"
    prompts: tuple[int, ...] | None = None
    # Sampling: one seed per prompt of the call (vLLM seeds a request's n samples seed, seed+1, ...), e.g.
    # cache.segment_seed of its segment. None: segment_seed(seed, str(place in the call)), which a prompt keeps
    # only as long as the list does not change.
    seeds: tuple[int, ...] | None = None


def _job_spec(job: VllmJob, ids: list[list[int]], indices: list[int]) -> dict:
    """The worker's job for the prompts `indices` (places in the call) with token ids `ids`."""
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
        seeds = (
            [job.seeds[i] for i in indices]
            if job.seeds is not None
            else [segment_seed(job.seed, str(i)) for i in indices]
        )
        spec.update(temperature=d.temperature, top_p=d.top_p, top_k=d.top_k, seeds=seeds)
    else:
        spec.update(temperature=0.0, seed=job.seed)
    return spec


def _check_python(python: str) -> None:
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        raise FileNotFoundError(
            f"the vLLM environment's python {python} does not exist: vLLM needs its own environment "
            f"(its torch and transformers>=5.16 pins clash with the main one); build it with `{MAKE_TARGET}`"
        )


def _complete_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """The whole lines of a file the worker is still writing, from byte `offset`, and the offset after them."""
    if not path.is_file():
        return [], offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    # Split on b"\n" only: str.splitlines would also split at U+2028 and the like, which JSON leaves in strings.
    lines = [json.loads(line) for line in data[:end].split(b"\n") if line]
    return lines, offset + end


def run_worker(
    python: str,
    request: dict,
    timeout: float | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    on_line: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run the worker on one request; its output lines (one per job), in job order.

    `env` adds variables to the worker's environment (e.g. VLLM_CACHE_ROOT, OMP_NUM_THREADS); the worker's
    log (vLLM's own) goes to `log_path` when given, and its tail into the error when the worker fails.
    `on_line(line)` gets each job's line as soon as the worker has written it, also those finished before the
    worker failed.
    """
    _check_python(python)
    worker_env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    worker_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    worker_env.update(env or {})
    lines: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="alma-r-vllm-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "outputs.jsonl"
        partial = out_path.with_name(out_path.name + ".partial")  # the worker's lines so far
        req_path.write_text(json.dumps(request), encoding="utf-8")
        log = Path(log_path) if log_path is not None else Path(tmp) / "worker.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [python, str(WORKER), str(req_path), str(out_path)]
        t0 = time.perf_counter()
        offset = 0

        def deliver(path: Path) -> None:
            nonlocal offset
            new, offset = _complete_lines(path, offset)
            lines.extend(new)
            if on_line is not None:
                for line in new:
                    on_line(line)

        with open(log, "w", encoding="utf-8") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=worker_env)
            try:
                while True:
                    try:
                        proc.wait(timeout=POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        if timeout is not None and time.perf_counter() - t0 > timeout:
                            raise RuntimeError(
                                f"the vLLM worker ran past {timeout}s; its log: {log}"
                            ) from None
                    deliver(partial)
            finally:
                if proc.poll() is None:  # timed out, or on_line failed: the worker must not outlive the call
                    proc.kill()
                    proc.wait()
        # Renamed into place once every job is done; the lines the worker got to before a failure otherwise.
        deliver(out_path if out_path.is_file() else partial)
        if proc.returncode != 0 or not out_path.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
            raise RuntimeError(
                f"the vLLM worker failed (exit code {proc.returncode}): {' '.join(cmd)}\n{tail}"
            )
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
    dtype: str = DEFAULT_DTYPE,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    engine_args: dict | None = None,
    trust_remote_code: bool = False,
    timeout: float | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    raw: bool = False,
    on_job: Callable[[int, list[list[str] | None]], None] | None = None,
) -> list[list[list[str] | None]]:
    """Per job, per prompt of the job (the call's, or those its `prompts` names): its n post-processed
    translations, or None for a prompt over `max_prompt_tokens`.

    One engine start serves every job. `max_model_len` defaults to `max_prompt_tokens` plus the largest
    `max_new_tokens`: every kept prompt fits with its whole generation, and the engine sizes its batches and
    KV cache for that rather than for the model's full context. `raw=True` returns the decoded texts before
    ALMA's post-processing. `on_job(j, outputs)` gets job j's outputs as soon as the worker has finished it.
    """
    _check_python(python)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    places = [list(job.prompts) if job.prompts is not None else list(range(len(prompts))) for job in jobs]
    kept = [[i for i in where if len(encoded[i]) <= max_prompt_tokens] for where in places]
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
        "jobs": [
            _job_spec(job, [encoded[i] for i in todo], todo) for job, todo in zip(jobs, kept, strict=True)
        ],
    }
    results: list[list[list[str] | None]] = [[] for _ in jobs]

    def job_outputs(line: dict) -> None:
        j = line["job"]
        job, where, todo = jobs[j], places[j], kept[j]
        if len(line["outputs"]) != len(todo):
            raise RuntimeError(f"the vLLM worker answered {len(line['outputs'])} of {len(todo)} prompts")
        texts_of: dict[int, list[str]] = {}
        for i, entry in zip(todo, line["outputs"], strict=True):
            # Decoded here, by the tokenizer the transformers backend uses, as it decodes its new tokens.
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in entry["token_ids"]]
            if len(texts) != job.n:
                raise RuntimeError(f"the vLLM worker returned {len(texts)} outputs for n={job.n}")
            texts_of[i] = texts if raw else [postprocess(t) for t in texts]
        results[j] = [texts_of.get(i) for i in where]
        if on_job is not None:
            on_job(j, results[j])

    run_worker(python, request, timeout=timeout, log_path=log_path, env=env, on_line=job_outputs)
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
