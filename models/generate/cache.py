"""A content-addressed cache of generated translations, so that a rerun (e.g. a scheduled retraining on grown
data) generates only what no earlier run did.

A generation is keyed by what its text depends on: the model's content (models/weights.py's weights_fingerprint:
a local folder by the digests of its files, a Hub model by its repository and commit), the backend, the exact
prompt, the decoding settings that change outputs (not the batch size), the sample's index k and its seed. The
seed of a sampled segment is derived from the run's seed and the segment's id (`segment_seed`), never from its
place in a batch, so a segment's samples do not depend on which other segments are generated with it, in which
order or shard. A prompt over the token limit is stored too, as a marker with its length, so a rerun counts it
as skipped without loading the model.

SQLite, like the score cache (models/score/cache.py): one file, each batch written in one transaction as soon as
it is generated, so a stage killed half-way keeps what it made; one writer process at a time.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from alma_r.data.digests import file_sha256
from alma_r.models.generate.hf_backend import Decoding
from alma_r.models.weights import weights_fingerprint


def segment_seed(run_seed: int, segment_id: str, k: int = 0) -> int:
    """The sampling seed of sample `k` of a segment: a hash of the run's seed and the segment's id, plus k.

    Hashed, so that no two segments draw the same random numbers (near-identical samples from similar prompts);
    plus k, because vLLM seeds the n samples of one request seed, seed+1, ..., so one request of n samples and n
    requests of one sample get the same seeds. The hash stays below 2**62: room for the k.
    """
    digest = hashlib.blake2b(f"{run_seed}:{segment_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 2) + k


def decoding_settings(decoding: Decoding) -> dict:
    """The decoding settings a policy model's outputs depend on; the sampling ones only when it samples (a
    greedy or beam decoding gives the same text whatever its temperature says)."""
    settings = {
        "num_beams": decoding.num_beams,
        "do_sample": decoding.do_sample,
        "max_new_tokens": decoding.max_new_tokens,
    }
    if decoding.do_sample:
        settings.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    return settings


def generation_key(model: dict, backend: str, prompt: str, settings: dict, k: int, seed: int | None) -> str:
    """The content hash of one generation: sample k of `prompt` by `model` (a fingerprint) with `settings`."""
    payload = json.dumps(
        {"model": model, "backend": backend, "prompt": prompt, "settings": settings, "k": k, "seed": seed},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Generation:
    """A cached generation: its text, or None for a prompt that was over the token limit, and the prompt's
    length in tokens (None for a backend without a limit, an endpoint)."""

    text: str | None
    prompt_tokens: int | None = None


class GenerationCache:
    def __init__(self, path: Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, text TEXT, prompt_tokens INTEGER)"
            )
            # A model folder's file digests by path, valid while size and modification time stay: a rerun does
            # not read a 26 GB model again to know it is the same.
            db.execute(
                "CREATE TABLE IF NOT EXISTS file_digests "
                "(path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, digest TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get_many(self, keys: list[str]) -> dict[str, Generation]:
        """{key: generation} for the keys that are cached."""
        found: dict[str, Generation] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, text, tokens in db.execute(
                    f"SELECT key, text, prompt_tokens FROM generations WHERE key IN ({marks})", chunk
                ):
                    found[key] = Generation(text, tokens)
        return found

    def put_many(self, entries: dict[str, Generation]) -> None:
        rows = [(k, g.text, g.prompt_tokens) for k, g in entries.items()]
        with self._connect() as db:  # one transaction: all or nothing
            db.executemany(
                "INSERT OR REPLACE INTO generations (key, text, prompt_tokens) VALUES (?, ?, ?)", rows
            )

    def file_digest(self, path: Path) -> str:
        """The sha256 of a file, remembered while its size and modification time stay the same."""
        path = Path(path).resolve()
        stat = path.stat()
        with self._connect() as db:
            row = db.execute(
                "SELECT digest FROM file_digests WHERE path = ? AND size = ? AND mtime_ns = ?",
                (str(path), stat.st_size, stat.st_mtime_ns),
            ).fetchone()
        if row:
            return row[0]
        digest = file_sha256(path)
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO file_digests (path, size, mtime_ns, digest) VALUES (?, ?, ?, ?)",
                (str(path), stat.st_size, stat.st_mtime_ns, digest),
            )
        return digest

    def model_fingerprint(self, model: str, adapter: str | None, dtype: str) -> dict:
        """What a policy model's outputs depend on: base weights and tokenizer, adapter, dtype."""
        return {
            "model": weights_fingerprint(model, digest=self.file_digest),
            "adapter": weights_fingerprint(adapter, digest=self.file_digest),
            "dtype": dtype,
        }


_MISSING = object()  # a generation neither cached nor made yet


class SystemGenerations:
    """The n samples of every prompt of one system: looked up in the cache, the rest filled by a backend batch by
    batch (each batch written to the cache at once), and counted per sample k.

    Prompts whose key is the same (the same source twice, decoded without sampling) are generated once.
    `max_prompt_tokens` (None: no limit) decides which cached prompts are skipped: a marker over a raised limit
    is generated now, a text over a lowered one is skipped.
    """

    def __init__(
        self,
        cache: GenerationCache,
        model: dict,
        backend: str,
        settings: dict,
        prompts: list[str],
        segment_ids: list[str],
        n: int,
        run_seed: int,
        seeded: bool,
        max_prompt_tokens: int | None,
    ):
        self.cache, self.n, self.limit = cache, n, max_prompt_tokens
        self.seeds = [
            [segment_seed(run_seed, sid, k) if seeded else None for k in range(n)] for sid in segment_ids
        ]
        self.keys = [
            [generation_key(model, backend, p, settings, k, seeds[k]) for k in range(n)]
            for p, seeds in zip(prompts, self.seeds, strict=True)
        ]
        self.slots: dict[str, list[tuple[int, int]]] = {}
        for i, keys in enumerate(self.keys):
            for k, key in enumerate(keys):
                self.slots.setdefault(key, []).append((i, k))
        self.outputs: list[list[object]] = [[_MISSING] * n for _ in prompts]
        self.prompt_tokens: dict[int, int] = {}
        self.generated, self.from_cache = [0] * n, [0] * n
        for key, generation in cache.get_many(list(self.slots)).items():
            value = self._value(generation)
            if value is _MISSING:
                continue
            for i, k in self.slots[key]:
                self.outputs[i][k] = value
                self.from_cache[k] += value is not None

    def _value(self, generation: Generation) -> object:
        tokens = generation.prompt_tokens
        if tokens is not None and self.limit is not None and tokens > self.limit:
            return None  # skipped, whether it was generated under a higher limit or marked
        return generation.text if generation.text is not None else _MISSING

    def missing(self) -> list[tuple[int, int]]:
        """One (prompt, sample) per missing key, in prompt order."""
        return [
            (i, k)
            for i, row in enumerate(self.outputs)
            for k, value in enumerate(row)
            if value is _MISSING and self.slots[self.keys[i][k]][0] == (i, k)
        ]

    def missing_prompts(self) -> dict[int, list[int]]:
        """{prompt: its missing samples k} for the prompts that generate, in prompt order."""
        todo: dict[int, list[int]] = {}
        for i, k in self.missing():
            todo.setdefault(i, []).append(k)
        return todo

    def measure(self, lengths: dict[int, int]) -> None:
        """The token lengths of prompts about to be generated: those over the limit are recorded as skipped."""
        self.prompt_tokens.update(lengths)
        over = [
            (i, k, None)
            for i, ks in self.missing_prompts().items()
            if self.limit is not None and lengths.get(i, 0) > self.limit
            for k in ks
        ]
        self.record(over)

    def record(self, done: Iterable[tuple[int, int, str | None]]) -> None:
        """Generations (prompt, sample, text; None: over the limit) of one batch, written in one transaction."""
        entries = {}
        for i, k, text in done:
            key = self.keys[i][k]
            entries[key] = Generation(text, self.prompt_tokens.get(i))
            for slot_i, slot_k in self.slots[key]:
                self.outputs[slot_i][slot_k] = text
                self.generated[slot_k] += text is not None
        if entries:
            self.cache.put_many(entries)

    def results(self) -> list[list[str | None]]:
        """Per prompt, per sample: the translation, or None where the prompt is over the limit."""
        left = sum(v is _MISSING for row in self.outputs for v in row)
        if left:
            raise RuntimeError(f"the backend left {left} generations undone")
        return self.outputs  # type: ignore[return-value]
