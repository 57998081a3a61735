"""COMET scoring sharded over processes: one worker per GPU (CUDA_VISIBLE_DEVICES), each loading the model once
and scoring its shard. COMET's own multi-GPU gather fails with torch >= 2.6, and one process per device also
returns every byte of GPU memory when it exits.

    python -m alma_r.models.score.comet_workers request.json scores.jsonl

The request (JSON): model, revision (the commit a Hub id resolved to, so every worker scores with that one),
batch_size, reference (true, false or null: the model's own kind) and items (the shard's {"src", "mt", "ref"}
dicts). The output: one {"score", "error_spans"} line per item, in order, written
atomically. The worker is only ever started by ShardedCometScorer, so it reads a file, not a command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from alma_r.data.files import write_text_atomic
from alma_r.models.score.comet_scorer import CometResult, CometScorer


class ShardedCometScorer:
    """The CometScorer interface, with `score` fanned out to `processes` worker processes."""

    def __init__(
        self,
        model: str,
        processes: int,
        batch_size: int = 16,
        reference: bool | None = None,
        revision: str | None = None,
    ):
        self.local = CometScorer(
            model, batch_size=batch_size, reference=reference, progress_bar=False, revision=revision
        )
        self.processes = processes
        self.segments_scored = 0

    model_id = property(lambda self: self.local.model_id)
    resolved = property(lambda self: self.local.resolved)
    signature = property(lambda self: self.local.signature)
    uses_reference = property(lambda self: self.local.uses_reference)

    def score(self, items: list[dict]) -> list[CometResult]:
        if not items:
            return []
        # Round-robin over length-sorted items: shards of similar total length finish together.
        order = sorted(range(len(items)), key=lambda i: len(items[i]["src"]) + len(items[i]["mt"]))
        shards = [order[k :: self.processes] for k in range(self.processes)]
        gpus = torch.cuda.device_count()
        with tempfile.TemporaryDirectory(prefix="alma-r-comet-") as tmp:
            procs = []
            for k, shard in enumerate(shards):
                if not shard:
                    continue
                request, out = Path(tmp) / f"request-{k}.json", Path(tmp) / f"out-{k}.jsonl"
                shard_request = {
                    "model": self.local.model_name,
                    "revision": self.resolved.commit if self.resolved else None,
                    "batch_size": self.local.batch_size,
                    "reference": self.local.reference,
                    "items": [items[i] for i in shard],
                }
                request.write_text(json.dumps(shard_request, ensure_ascii=False), "utf-8")
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
                cmd = [sys.executable, "-m", "alma_r.models.score.comet_workers", str(request), str(out)]
                procs.append((shard, out, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)))
            results: list[CometResult | None] = [None] * len(items)
            for shard, out, proc in procs:
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"COMET worker for {self.model_id} failed ({proc.returncode}): {err[-2000:]}"
                    )
                lines = out.read_text("utf-8").splitlines()
                for i, line in zip(shard, lines, strict=True):
                    row = json.loads(line)
                    results[i] = CometResult(row["score"], row["error_spans"])
        self.segments_scored += len(items)
        return results


def score_request(request_path: Path, output: Path) -> None:
    """Score one shard: the request file's items with its model, one JSON line per item into `output`."""
    request = json.loads(Path(request_path).read_text("utf-8"))
    scorer = CometScorer(
        request["model"],
        batch_size=int(request.get("batch_size", 16)),
        reference=request.get("reference"),
        progress_bar=False,
        revision=request.get("revision"),
    )
    results = scorer.score(request["items"])
    write_text_atomic(
        Path(output),
        "".join(
            json.dumps({"score": r.score, "error_spans": r.error_spans}, ensure_ascii=False) + "\n"
            for r in results
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m alma_r.models.score.comet_workers REQUEST.json OUTPUT.jsonl", file=sys.stderr)
        return 2
    score_request(Path(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
