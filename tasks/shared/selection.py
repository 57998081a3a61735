"""The preference-pair rule of ALMA-R ("Contrastive Preference Optimization: Pushing the Boundaries of LLM
Performance in Machine Translation", Xu et al., ICML 2024, section 3): per source, chosen = the best-scored
translation, rejected = the worst (or the chosen one with noise), ties dropped; a human label between two of the
candidates decides instead of the scores where there is one. Beyond ALMA-R's one pair per source, `pairs_mode`
keeps more of the scored pool: best_vs_all (the best against every candidate worse by at least min_margin) and
top_k_bottom_k (each of the k best against each of the k worst); a source's pairs then carry the weight
1 / (its number of pairs), so that every source counts once in the loss. Plain functions of rows, shared by the
select stage (tasks/select.py), the learning check and `alma-r published-pairs`."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict

from alma_r.data.schemas import REFERENCE
from alma_r.models.prompts import make_prompt

NOISE = "noise"
PAIRS_MODES = ("best_worst", "best_vs_all", "top_k_bottom_k")


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


def zscores(
    segments: list[dict],
    texts: dict[tuple[str, str], str],
    scores: dict[tuple[str, str, str], float],
    metrics: list[str],
) -> dict[tuple[str, str, str], float]:
    """`scores` of the given metrics as z-scores, per direction and metric, over every scored candidate and
    reference of that direction (population standard deviation; a pool whose scores are all equal gives 0):
    metrics on different scales (chrF 0-100, COMET 0-1) then weigh alike in a mean."""
    lp_of = {seg["id"]: seg["lp"] for seg in segments}
    pools: dict[tuple[str, str], list[tuple[str, str, str]]] = defaultdict(list)
    for sid, system in texts:
        if sid in lp_of:
            for m in metrics:
                if (sid, system, m) in scores:
                    pools[(lp_of[sid], m)].append((sid, system, m))
    out = {}
    for keys in pools.values():
        values = [scores[k] for k in keys]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        out.update({k: (scores[k] - mean) / std if std > 0 else 0.0 for k in keys})
    return out


def label_preferences(
    human_labels: dict[str, float] | None, override_systems: tuple[str, str] | None
) -> dict[str, tuple[str, str]]:
    """segment_id -> (chosen, rejected) from signed labels between two fixed systems (the published data's
    Delta: > 0 chooses override_systems[0], < 0 the reverse, 0: no label)."""
    if not human_labels or not override_systems:
        return {}
    first, second = override_systems
    return {sid: (first, second) if d > 0 else (second, first) for sid, d in human_labels.items() if d}


def human_choice(
    preference: tuple[str, str] | None, candidates: list[str] | set[str]
) -> tuple[str, str] | None:
    """The labelled (chosen, rejected) when both are among the segment's candidates, else None (the scores
    decide)."""
    if preference and all(s in candidates for s in preference):
        return preference
    return None


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
    preferences: dict[str, tuple[str, str]] | None = None,
    normalize: str = "none",
    pairs_mode: str = "best_worst",
    top_k: int = 2,
) -> tuple[list[dict], list[dict]]:
    """The selection rule, pure.

    texts: (segment_id, system) -> translation (the reference under system 'reference');
    scores: (segment_id, system, metric) -> score; human_labels: segment_id -> Delta, where Delta > 0 chooses
    override_systems[0] over override_systems[1], Delta < 0 the reverse, 0 leaves it to the scores;
    preferences: segment_id -> (chosen, rejected) labels between any two systems (the ingest stage's
    human_preferences table; wins over human_labels for the same segment). A label decides only when both of its
    systems are candidates of the segment, and its pair is kept whatever the margin.
    rejected: "worst" (ALMA-R) or "noise" (the noised chosen translation); normalize: "none" or "zscore" (the
    metrics are z-scored, `zscores`, before the mean, and margins are in standard deviations).
    pairs_mode: best_worst (ALMA-R: one pair), best_vs_all or top_k_bottom_k (`top_k`), several pairs weighted
    1/n (module docstring); a labelled segment keeps its one labelled pair. Returns (pairs, dropped).
    """
    if pairs_mode not in PAIRS_MODES:
        raise ValueError(f"pairs_mode must be one of {', '.join(PAIRS_MODES)}, not {pairs_mode!r}")
    if pairs_mode != "best_worst" and rejected == "noise":
        raise ValueError(f"pairs_mode {pairs_mode!r} needs scored rejected candidates, not rejected='noise'")
    order = [REFERENCE, *systems]
    pairs, dropped = [], []
    labels = {**label_preferences(human_labels, override_systems), **(preferences or {})}
    if normalize == "zscore":
        scores = zscores(segments, texts, scores, metrics)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none' or 'zscore', not {normalize!r}")

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
        labelled = human_choice(labels.get(sid), scored)
        if pairs_mode != "best_worst" and not labelled:
            combos = pool_pairs(scored, mean, pairs_mode, top_k, min_margin)
            combos = [(c, r) for c, r in combos if texts[(sid, c)].strip() != texts[(sid, r)].strip()]
            if not combos:
                drop(seg, "margin_below_threshold", f"no candidate worse by >= {min_margin} ({pairs_mode})")
                continue
            pairs += [
                pair_row(seg, texts[(sid, c)], texts[(sid, r)], c, r, mean[c], mean[r], 1 / len(combos))
                for c, r in combos
            ]
            continue
        if labelled:
            chosen, worst = labelled
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
        if margin is not None and margin < min_margin and not labelled:
            drop(seg, "margin_below_threshold", f"{margin:.4f} < {min_margin}")
            continue
        pairs.append(
            pair_row(
                seg,
                texts[(sid, chosen)],
                rejected_text,
                chosen,
                rejected_system,
                mean[chosen],
                rejected_score,
            )
        )
    return pairs, dropped


def pool_pairs(
    scored: list[str], mean: dict[str, float], pairs_mode: str, top_k: int, min_margin: float
) -> list[tuple[str, str]]:
    """(chosen, rejected) systems of one source beyond best_worst: every combination whose margin is positive
    and at least min_margin. best_vs_all: the best against each other candidate; top_k_bottom_k: each of the
    min(top_k, n // 2) best against each of as many worst. `scored` is in tie-break order (sorted() is stable)."""
    ranked = sorted(scored, key=lambda s: -mean[s])
    if pairs_mode == "best_vs_all":
        combos = [(ranked[0], r) for r in ranked[1:]]
    else:
        k = min(top_k, len(ranked) // 2)
        combos = [(c, r) for c in ranked[:k] for r in ranked[len(ranked) - k :]]
    return [(c, r) for c, r in combos if mean[c] - mean[r] > 0 and mean[c] - mean[r] >= min_margin]


def pair_row(
    seg: dict,
    chosen_text: str,
    rejected_text: str,
    chosen_system: str,
    rejected_system: str,
    chosen_score: float,
    rejected_score: float | None,
    weight: float = 1.0,
) -> dict:
    """One PAIRS row; the margin is null where the rejected side has no score (a noised copy)."""
    return {
        "prompt": make_prompt(seg["src"], seg["src_lang"], seg["tgt_lang"]),
        "chosen": chosen_text,
        "rejected": rejected_text,
        "segment_id": seg["id"],
        "lp": seg["lp"],
        "chosen_system": chosen_system,
        "rejected_system": rejected_system,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "margin": None if rejected_score is None else chosen_score - rejected_score,
        "weight": weight,
    }


def labelled_segments(
    pairs: list[dict], preferences: dict[str, tuple[str, str]], texts: dict[tuple[str, str], str]
) -> set[str]:
    """The segments whose pair a human label decided (select_pairs' rule: both labelled systems candidates)."""
    candidates: dict[str, set[str]] = defaultdict(set)
    for sid, system in texts:
        candidates[sid].add(system)
    return {
        p["segment_id"]
        for p in pairs
        if human_choice(preferences.get(p["segment_id"]), candidates[p["segment_id"]])
    }


def selection_stats(pairs: list[dict], dropped: list[dict], labelled: set[str] | None = None) -> dict:
    """The paper's Table 2 layout: share of chosen (and rejected) translations by system, per direction; with
    `labelled` (labelled_segments), how many pairs a human label decided (`from_human_labels`)."""
    by_lp: dict[str, dict] = defaultdict(lambda: {"pairs": 0, "chosen": Counter(), "rejected": Counter()})
    for p in pairs:
        entry = by_lp[p["lp"]]
        entry["pairs"] += 1
        entry["chosen"][p["chosen_system"]] += 1
        entry["rejected"][p["rejected_system"]] += 1
        if labelled is not None:
            entry["from_human_labels"] = entry.get("from_human_labels", 0) + (p["segment_id"] in labelled)
    stats = {
        "pairs": len(pairs),
        "dropped": dict(Counter(d["reason"] for d in dropped)),
        "by_lp": {
            lp: {
                "pairs": e["pairs"],
                "chosen": dict(e["chosen"]),
                "rejected": dict(e["rejected"]),
                **({"from_human_labels": e["from_human_labels"]} if labelled is not None else {}),
            }
            for lp, e in sorted(by_lp.items())
        },
    }
    if labelled is not None:
        stats["from_human_labels"] = sum(p["segment_id"] in labelled for p in pairs)
    return stats
