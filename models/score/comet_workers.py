"""COMET scoring sharded over processes: one worker per GPU (CUDA_VISIBLE_DEVICES), each loading the model once
and scoring its shard. COMET's own multi-GPU gather fails with torch >= 2.6, and one process per device also
returns every byte of GPU memory when it exits.

    python -m alma_r.models.score.comet_workers --model M --input shard.jsonl --output scores.jsonl [--reference 0|1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from alma_r.data.io import write_text_atomic
from alma_r.models.score.comet_scorer import CometResult, CometScorer


class ShardedCometScorer:
    """The CometScorer interface, with `score` fanned out to `processes` worker processes."""

    def __init__(self, model: str, processes: int, batch_size: int = 16, reference: bool | None = None):
        self.local = CometScorer(model, batch_size=batch_size, reference=reference, progress_bar=False)
        self.processes = processes
        self.segments_scored = 0

    model_id = property(lambda self: self.local.model_id)
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
                inp, out = Path(tmp) / f"in-{k}.jsonl", Path(tmp) / f"out-{k}.jsonl"
                inp.write_text(
                    "".join(json.dumps(items[i], ensure_ascii=False) + "\n" for i in shard), "utf-8"
                )
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(k % gpus)
                cmd = [
                    sys.executable,
                    "-m",
                    "alma_r.models.score.comet_workers",
                    "--model",
                    self.model_id,
                    "--input",
                    str(inp),
                    "--output",
                    str(out),
                    "--batch-size",
                    str(self.local.batch_size),
                ]
                if self.local.reference is not None:
                    cmd += ["--reference", str(int(self.local.reference))]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reference", type=int, choices=[0, 1], default=None)
    args = parser.parse_args()
    items = [json.loads(line) for line in args.input.read_text("utf-8").splitlines()]
    reference = None if args.reference is None else bool(args.reference)
    scorer = CometScorer(args.model, batch_size=args.batch_size, reference=reference, progress_bar=False)
    results = scorer.score(items)
    write_text_atomic(
        args.output,
        "".join(
            json.dumps({"score": r.score, "error_spans": r.error_spans}, ensure_ascii=False) + "\n"
            for r in results
        ),
    )


if __name__ == "__main__":
    main()
