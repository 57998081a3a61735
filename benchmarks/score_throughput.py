"""Scoring throughput of the COMET backend on CPU, with and without alma-r's dedup + score cache.

    .venv/bin/python benchmarks/score_throughput.py [--segments 200] [--kind xcomet]

A tiny COMET checkpoint is built offline (models/score/tiny_comet.py), so the numbers measure the pipeline around
the model (batching, Lightning's predict, dedup, cache), not a real XXL model. The candidate set is what the
score stage sees in ALMA-R: per source the reference and two systems, where one system's output equals the
reference for 30% of the sources (a common case: a system copying a short reference). All three modes score
the same requests in one run:

  naive      every request goes to the model (what a plain `comet-score` per system does)
  dedup      alma-r's score stage, cold cache: each distinct (model, src, mt) once
  cached     the same again with the cache warm: no forward pass at all
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from alma_r.config import SAMPLE_DIR
from alma_r.models.score.cache import ScoreCache
from alma_r.models.score.comet_scorer import CometScorer
from alma_r.tasks.shared.scoring import score_items


def candidate_set(n: int, seed: int = 0) -> list[tuple[dict, str, str, list[str]]]:
    src = (SAMPLE_DIR / "wmt22/deen/test.de-en.de").read_text(encoding="utf-8").splitlines()
    ref = (SAMPLE_DIR / "wmt22/deen/test.de-en.en").read_text(encoding="utf-8").splitlines()
    hyp = (SAMPLE_DIR / "alma13br/deen/test.de-en.en").read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    items = []
    for i in range(n):
        j = i % len(src)
        seg = {
            "id": f"s{i}",
            "lp": "de-en",
            "src": src[j] + ("" if i < len(src) else f" ({i // len(src)})"),
            "ref": ref[j],
        }
        words = hyp[j].split()
        rng.shuffle(words)
        systems = {
            "reference": ref[j],
            "alma": ref[j] if rng.random() < 0.3 else hyp[j],
            "shuffled": " ".join(words),
        }
        for system, text in systems.items():
            items.append((seg, system, text, []))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--segments", type=int, default=200)
    parser.add_argument("--kind", default="xcomet", choices=["regression", "kiwi", "xcomet"])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from alma_r.models.score.tiny_comet import build_tiny_comet

    tmp = Path(tempfile.mkdtemp(prefix="alma-r-score-bench-"))
    items = candidate_set(args.segments)
    texts = sorted({t for seg, _, t, _ in items} | {seg["src"] for seg, _, _, _ in items})
    checkpoint = build_tiny_comet(tmp / "model", args.kind, texts)
    scorer = CometScorer(str(checkpoint), batch_size=args.batch_size, reference=False, progress_bar=False)
    _ = scorer.model  # load once, outside the timings

    rows = []
    t0 = time.perf_counter()
    scorer.score([{"src": seg["src"], "mt": text} for seg, _, text, _ in items])
    naive = time.perf_counter() - t0
    rows.append(("naive (no dedup, no cache)", len(items), scorer.segments_scored, naive))

    cache = ScoreCache(tmp / "cache.sqlite")
    for label in ("dedup, cold cache", "dedup, warm cache"):
        before, counts = scorer.segments_scored, {}
        t0 = time.perf_counter()
        score_items(scorer, "bench", items, cache, counts)
        rows.append((label, len(items), scorer.segments_scored - before, time.perf_counter() - t0))

    print(
        f"COMET backend, tiny {args.kind} checkpoint on CPU; {args.segments} sources x 3 candidates "
        f"(reference, a system equal to the reference for 30% of sources, another system)\n"
    )
    print("| mode | requests | model forward (segments) | seconds | requests/s | speed-up vs naive |")
    print("|---|---|---|---|---|---|")
    for label, n, forward, seconds in rows:
        print(f"| {label} | {n} | {forward} | {seconds:.2f} | {n / seconds:.1f} | {naive / seconds:.2f}x |")


if __name__ == "__main__":
    main()
