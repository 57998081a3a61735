"""The preference-pair rule of ALMA-R ("Contrastive Preference Optimization: Pushing the Boundaries of LLM
Performance in Machine Translation", Xu et al., ICML 2024, section 3): per source, chosen = the best-scored
translation, rejected = the worst (or the chosen one with noise), ties dropped. Plain functions of rows, shared
by the select stage (tasks/select.py) and the learning check."""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict

from alma_r.data.schemas import REFERENCE
from alma_r.models.prompts import make_prompt

NOISE = "noise"


def add_noise(text: str, rng: random.Random, p_delete: float = 0.15, p_swap: float = 0.3) -> tuple[str, dict]:
    """Each word deleted with p_delete, then each adjacent pair of the survivors swapped with p_swap (a swapped
    pair is not considered again). Returns the text and counts: words, deleted, swap trials, swaps."""
    words = text.split()
    kept = [w for w in words if rng.random() >= p_delete]
    stats = {"words": len(words), "deleted": len(words) - len(kept), "swap_trials": 0, "swaps": 0}
    i = 0
    while i < len(kept) - 1:
        stats["swap_trials"] += 1
        if rng.random() < p_swap:
            kept[i], kept[i + 1] = kept[i + 1], kept[i]
            stats["swaps"] += 1
            i += 2
        else:
            i += 1
    return " ".join(kept), stats


def _segment_rng(seed: int, segment_id: str) -> random.Random:
    """One generator per segment: the noise of a segment does not depend on which other segments exist."""
    return random.Random(int(hashlib.sha256(f"{seed}:{segment_id}".encode()).hexdigest()[:16], 16))


def select_pairs(
    segments: list[dict],
    texts: dict[tuple[str, str], str],
    scores: dict[tuple[str, str, str], float],
    systems: list[str],
    metrics: list[str],
    min_margin: float = 0.0,
    human_labels: dict[str, float] | None = None,
    override_systems: tuple[str, str] | None = None,
    rejected: str = "worst",
    noise: tuple[float, float] = (0.15, 0.3),
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """The selection rule, pure.

    texts: (segment_id, system) -> translation (the reference under system 'reference');
    scores: (segment_id, system, metric) -> score; human_labels: segment_id -> Delta, where Delta > 0 chooses
    override_systems[0] over override_systems[1], Delta < 0 the reverse, 0 leaves it to the scores.
    rejected: "worst" (ALMA-R) or "noise" (the noised chosen translation). Returns (pairs, dropped).
    """
    order = [REFERENCE, *systems]
    pairs, dropped = [], []

    def drop(seg, reason, detail):
        dropped.append({"segment_id": seg["id"], "lp": seg["lp"], "reason": reason, "detail": detail})

    for seg in segments:
        sid = seg["id"]
        present = [s for s in order if (sid, s) in texts]
        scored = [s for s in present if all((sid, s, m) in scores for m in metrics)]
        if len(scored) < len(present):
            drop(seg, "missing_score", f"no score for {sorted(set(present) - set(scored))}")
            continue
        if len(scored) < (1 if rejected == "noise" else 2):
            drop(seg, "too_few_candidates", f"candidates: {scored}")
            continue
        mean = {s: sum(scores[(sid, s, m)] for m in metrics) / len(metrics) for s in scored}
        delta = (human_labels or {}).get(sid, 0.0)
        if delta and override_systems and all(s in scored for s in override_systems):
            chosen, worst = override_systems if delta > 0 else override_systems[::-1]
        else:
            # max()/min() return the first of equal elements, and `scored` is in tie-break order.
            chosen = max(scored, key=lambda s: mean[s])
            worst = min(scored, key=lambda s: mean[s])
        if rejected == "noise":
            rejected_text, _ = add_noise(texts[(sid, chosen)], _segment_rng(seed, sid), *noise)
            rejected_system, rejected_score, margin = NOISE, None, None
        else:
            rejected_text, rejected_system = texts[(sid, worst)], worst
            rejected_score, margin = mean[worst], mean[chosen] - mean[worst]
        if texts[(sid, chosen)].strip() == rejected_text.strip():
            drop(
                seg,
                "chosen_equals_rejected",
                "every candidate scored the same"
                if chosen == rejected_system
                else f"{chosen} vs {rejected_system}",
            )
            continue
        if margin is not None and margin < min_margin and not delta:
            drop(seg, "margin_below_threshold", f"{margin:.4f} < {min_margin}")
            continue
        pairs.append(
            {
                "prompt": make_prompt(seg["src"], seg["src_lang"], seg["tgt_lang"]),
                "chosen": texts[(sid, chosen)],
                "rejected": rejected_text,
                "segment_id": sid,
                "lp": seg["lp"],
                "chosen_system": chosen,
                "rejected_system": rejected_system,
                "chosen_score": mean[chosen],
                "rejected_score": rejected_score,
                "margin": margin,
            }
        )
    return pairs, dropped


def selection_stats(pairs: list[dict], dropped: list[dict]) -> dict:
    """The paper's Table 2 layout: share of chosen (and rejected) translations by system, per direction."""
    by_lp: dict[str, dict] = defaultdict(lambda: {"pairs": 0, "chosen": Counter(), "rejected": Counter()})
    for p in pairs:
        entry = by_lp[p["lp"]]
        entry["pairs"] += 1
        entry["chosen"][p["chosen_system"]] += 1
        entry["rejected"][p["rejected_system"]] += 1
    return {
        "pairs": len(pairs),
        "dropped": dict(Counter(d["reason"] for d in dropped)),
        "by_lp": {
            lp: {"pairs": e["pairs"], "chosen": dict(e["chosen"]), "rejected": dict(e["rejected"])}
            for lp, e in sorted(by_lp.items())
        },
    }
