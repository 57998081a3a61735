"""ARPO's rejection weight on the learning check's pairs: the length-averaged log-prob gaps of one seed's pairs
under its SFT model (where ARPO training starts), and the share of pairs whose tau is at most 0.

    PYTHONPATH=. .venv/bin/python scripts/arpo_gaps.py --variant imperfect --seed 0     (~1.5 min on one core)

It runs the seed's SFT, sampling and selection (`run_seed` with the SFT row only), then reads the gaps off one
forward pass; docs/learning-check.md quotes its output.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from alma_r.experiments import learning_check as lc
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.train.batching import tokenize_pairs
from alma_r.models.train.settings import TrainSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=sorted(lc.VARIANTS), default="imperfect")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    variant, sizes, seed = lc.VARIANTS[args.variant], lc.Sizes(), args.seed
    defaults = TrainSettings()
    with tempfile.TemporaryDirectory() as tmp:
        result = lc.run_seed(variant, seed, sizes, Path(tmp), systems=("sft",))  # SFT, candidates, pairs
        tokenizer, model = load_tokenizer(str(result.sft_dir)), load_model(str(result.sft_dir))
        examples, _ = tokenize_pairs(tokenizer, result.pairs, 64, 128)
        with lc.one_torch_thread():
            chosen, rejected, n_chosen, n_rejected = lc.pair_logps(model, tokenizer.pad_token_id, examples)
    gaps = (chosen / n_chosen - rejected / n_rejected).abs().tolist()
    gaps.sort()
    scale, rate = defaults.arpo_scale, defaults.arpo_rate
    zero = math.log(1 / scale) / rate  # tau = 0 here

    def tau(gap: float) -> float:
        return min(scale * math.exp(rate * gap) - 1, 1.0)

    quantile = {q: gaps[round(q * (len(gaps) - 1))] for q in (0.1, 0.5, 0.9)}
    print(
        f"{args.variant} seed {seed}: {len(gaps)} pairs; tau = min({scale} exp({rate} gap) - 1, 1), 0 at gap {zero:.3f}"
    )
    for q, gap in quantile.items():
        print(f"  {int(q * 100)}th percentile gap {gap:.3f} nats/token, tau {tau(gap):+.3f}")
    print(f"  pairs with tau <= 0: {sum(g <= zero for g in gaps) / len(gaps):.2f}")


if __name__ == "__main__":
    main()
