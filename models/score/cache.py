"""A content-addressed cache of segment scores: each distinct (model, src, mt[, ref]) is scored once, across
systems, stages and reruns. SQLite: one file, atomic transactions, safe to share between runs of a root."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path


def score_key(model_id: str, src: str, mt: str, ref: str | None, context: object = None) -> str:
    """The content hash of one scoring request. `context` carries anything else the score depends on
    (e.g. the other candidates for a consensus score)."""
    payload = json.dumps([model_id, src, mt, ref, context], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ScoreCache:
    def __init__(self, path: Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL, extra TEXT)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def get_many(self, keys: list[str]) -> dict[str, tuple[float, object]]:
        """{key: (score, extra)} for the keys that are cached."""
        found: dict[str, tuple[float, object]] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, score, extra in db.execute(
                    f"SELECT key, score, extra FROM scores WHERE key IN ({marks})", chunk
                ):
                    found[key] = (score, json.loads(extra) if extra is not None else None)
        return found

    def put_many(self, entries: dict[str, tuple[float, object]]) -> None:
        rows = [
            (k, s, json.dumps(e, ensure_ascii=False) if e is not None else None)
            for k, (s, e) in entries.items()
        ]
        with self._connect() as db:  # one transaction: all or nothing
            db.executemany("INSERT OR REPLACE INTO scores (key, score, extra) VALUES (?, ?, ?)", rows)
