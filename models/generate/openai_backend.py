"""Translations (or any completions) from an OpenAI-compatible HTTP endpoint (GPT-4, or a `vllm serve` server):
chat or completions.

Bounded concurrency, retries with exponential backoff on 429/5xx and connection errors (honouring Retry-After),
and a disk cache keyed by the request, so that a rerun or a crash never pays for the same request twice.

The API key is given, already resolved, by the caller (a stage or the judge CLI reads it from an environment
variable or a secret store): this module knows nothing of where secrets live. It is sent only in the
Authorization header, left out of EndpointConfig's repr and of the cache key, and never appears in logs or
errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from alma_r.models.prompts import postprocess

RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api: str = "chat"  # "chat" (/chat/completions) or "completions" (/completions)
    max_concurrency: int = 4
    max_retries: int = 6
    timeout_s: float = 120.0
    backoff_s: float = 1.0  # first retry delay; doubles each time, with jitter
    # The bearer token, None for a server without one (a local `vllm serve`). Out of the repr, so that printing
    # or logging the config never shows it, and out of comparisons.
    api_key: str | None = field(default=None, repr=False, compare=False)


class RequestCache:
    """SQLite: request hash -> response text. One row per finished request, committed as soon as it arrives."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT NOT NULL)")
        self.db.commit()

    @staticmethod
    def key(body: dict) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT text FROM responses WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, text: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO responses (key, text) VALUES (?, ?)", (key, text))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def request_body(
    cfg: EndpointConfig,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    extra: dict | None = None,
) -> dict:
    body = {"model": cfg.model, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        body["seed"] = seed
    if extra:  # further API parameters (e.g. logit_bias); part of the body, hence of the cache key
        body.update(extra)
    if cfg.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def response_text(cfg: EndpointConfig, payload: dict) -> str:
    choice = payload["choices"][0]
    return choice["message"]["content"] if cfg.api == "chat" else choice["text"]


class EndpointError(RuntimeError):
    pass


async def _post(
    client: httpx.AsyncClient, cfg: EndpointConfig, body: dict, headers: dict, stats: dict
) -> str:
    url = cfg.base_url.rstrip("/") + ("/chat/completions" if cfg.api == "chat" else "/completions")
    delay = cfg.backoff_s
    for attempt in range(cfg.max_retries + 1):
        stats["requests"] += 1
        try:
            response = await client.post(url, json=body, headers=headers, timeout=cfg.timeout_s)
        except (httpx.TransportError, httpx.TimeoutException) as err:
            status, retry_after, detail = None, None, type(err).__name__
        else:
            if response.status_code == 200:
                return response_text(cfg, response.json())
            status, detail = response.status_code, response.text[:200]
            retry_after = response.headers.get("retry-after")
            if status not in RETRYABLE:
                raise EndpointError(f"{url}: HTTP {status}: {detail}")
        if attempt == cfg.max_retries:
            raise EndpointError(f"{url}: gave up after {attempt + 1} attempts (last: {status or detail})")
        stats["retries"] += 1
        wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else delay
        await asyncio.sleep(wait * (1 + 0.25 * random.random()))
        delay *= 2
    raise AssertionError("unreachable")


async def _complete_all(
    cfg: EndpointConfig,
    bodies: list[dict],
    cache: RequestCache,
    stats: dict,
    on_result: Callable[[int, str], None] | None = None,
) -> list[str]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limit = asyncio.Semaphore(cfg.max_concurrency)
    results: list[str | None] = [None] * len(bodies)
    bar = tqdm(total=len(bodies), desc=f"{cfg.model} via {cfg.api}", unit="req", disable=None)

    async with httpx.AsyncClient() as client:

        async def one(i: int, body: dict):
            k = RequestCache.key(body)
            cached = cache.get(k)
            if cached is not None:
                stats["cached"] += 1
                results[i] = cached
            else:
                async with limit:
                    results[i] = await _post(client, cfg, body, headers, stats)
                cache.put(k, results[i])  # committed at once: a crash later never pays for it again
            if on_result is not None:
                on_result(i, results[i])
            bar.update(1)

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    bar.close()
    return results


def complete_via_endpoint(
    cfg: EndpointConfig,
    prompts: list[str],
    cache_path: Path,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    extra: dict | None = None,
    seeds: list[int] | None = None,
    on_result: Callable[[int, str], None] | None = None,
) -> tuple[list[str], dict]:
    """The raw completion text of each prompt, in order, and request statistics
    (requests sent, retries, answered from the cache).

    `seeds`: one request seed per prompt (e.g. derived from its segment, so that its answer does not depend on
    which prompts are sent with it), instead of `seed` for all. `on_result(i, text)` gets each answer as it
    arrives (in any order)."""
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    bodies = [
        request_body(cfg, p, max_tokens, temperature, top_p, seed if seeds is None else seeds[i], extra)
        for i, p in enumerate(prompts)
    ]
    stats = {"requests": 0, "retries": 0, "cached": 0}
    cache = RequestCache(cache_path)
    try:
        texts = asyncio.run(_complete_all(cfg, bodies, cache, stats, on_result))
    finally:
        cache.close()
    return texts, stats


def translate_via_endpoint(
    cfg: EndpointConfig,
    prompts: list[str],
    cache_path: Path,
    on_result: Callable[[int, str], None] | None = None,
    **sampling,
) -> tuple[list[str], dict]:
    """ALMA-post-processed translations, one per prompt, and request statistics (requests sent, retries,
    answered from the cache). `sampling`: complete_via_endpoint's max_tokens, temperature, top_p, seed or
    seeds. `on_result(i, translation)` gets each translation as it arrives."""
    texts, stats = complete_via_endpoint(
        cfg,
        prompts,
        cache_path,
        on_result=None if on_result is None else lambda i, text: on_result(i, postprocess(text)),
        **sampling,
    )
    return [postprocess(t) for t in texts], stats
