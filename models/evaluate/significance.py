"""Paired bootstrap significance against a baseline.

String metrics use sacreBLEU's own paired bootstrap (the CLI's `--paired-bs`: sufficient statistics resampled,
1000 samples, seed 12345 unless SACREBLEU_SEED says otherwise). Segment-level metrics (COMET) use the same
procedure on segment-score means: p = (#{resampled |diff| - mean |diff| > observed |diff|} + 1) / (n + 1).
"""

from __future__ import annotations

import os

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from alma_r.models.score.scorers import bleu_tokenize


def sacrebleu_paired_bs(
    baseline: list[str],
    systems: dict[str, list[str]],
    references: list[str],
    tgt_lang: str,
    n_samples: int = 1000,
) -> dict[tuple[str, str], float]:
    """{(system, "bleu"|"chrf"): p-value} of each system against the baseline."""
    if not systems:
        return {}
    named = [("baseline", baseline), *systems.items()]
    metrics = {"BLEU": BLEU(tokenize=bleu_tokenize(tgt_lang)), "chrF": CHRF()}
    _, results = PairedTest(named, metrics, [references], test_type="bs", n_samples=n_samples)()
    out = {}
    for system, hyps in systems.items():
        if hyps == baseline:  # sacreBLEU's test gives identical outputs p = 1/(n+1)
            out[(system, "bleu")] = out[(system, "chrf")] = 1.0
    for name, key in (("bleu", "BLEU"), ("chrf", next(k for k in results if k.startswith("chrF")))):
        for system, result in zip(results["System"][1:], results[key][1:], strict=True):
            out.setdefault((system, name), result.p_value)
    return out


def segment_paired_bs(
    baseline: list[float], system: list[float], n_samples: int = 1000, seed: int | None = None
) -> float:
    """p-value of the difference of mean segment scores, by paired bootstrap resampling."""
    if seed is None:
        env = os.environ.get("SACREBLEU_SEED", "12345")
        seed = None if env.lower() == "none" else int(env)
    bl, sys_ = np.asarray(baseline, dtype=np.float64), np.asarray(system, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(bl), size=(n_samples, len(bl)), replace=True)
    observed = abs(sys_.mean() - bl.mean())
    if observed == 0:
        return 1.0  # no difference to explain (the resampled statistic would call it significant)
    sample_diffs = np.abs(sys_[idx].mean(1) - bl[idx].mean(1))
    stats = sample_diffs - sample_diffs.mean()
    return (np.sum(stats > observed).item() + 1) / (n_samples + 1)
