"""Quality-aware decoding for the evaluate stage: a prompt's beam candidates reranked by a reference-free metric
(QE reranking) or by expected utility against each other (MBR), every score through the score cache (a rerun, or
another run with the same candidates, scores nothing twice). The choice rules are models/evaluate/quality_aware.py.

MBR's utilities are the project's own cached scorers rather than `mbrs` (PyPI): the whole N x N utility table
goes through score_items, so it is deduplicated and cached like every other score, and chrF/BLEU keep
sacreBLEU's signatures; `mbrs` would compute them outside the cache.
"""

from __future__ import annotations

from collections import defaultdict

from alma_r.models.evaluate.quality_aware import mbr_choice, qe_choice
from alma_r.models.score.cache import ScoreCache
from alma_r.tasks.shared.scoring import score_items


def rerank(
    tests: list[dict],
    candidates: list[list[str] | None],
    mode: str,
    scorer_for,
    metric: str,
    cache: ScoreCache,
    counts: dict,
) -> list[str | None]:
    """One translation per test segment chosen from its candidates (None stays None: a prompt over the limit).

    mode: qe_rerank (score each candidate with `metric`, reference-free; consensus chrF sees the other
    candidates) or mbr (`metric` as the utility: candidate i scored against candidate j as its reference).
    scorer_for(tgt_lang) gives the metric's scorer for a target language."""
    by_lang: dict[str, list[int]] = defaultdict(list)
    for i, seg in enumerate(tests):
        if candidates[i]:
            by_lang[seg["tgt_lang"]].append(i)
    chosen: list[str | None] = [None] * len(tests)
    for tgt_lang, idx in by_lang.items():
        scorer = scorer_for(tgt_lang)
        items, where = [], []
        for i in idx:
            cands = candidates[i]
            for a, text in enumerate(cands):
                if mode == "qe_rerank":
                    others = [c for b, c in enumerate(cands) if b != a]
                    items.append((tests[i], f"candidate{a}", text, others))
                    where.append((i, a, a))
                else:
                    for b, ref in enumerate(cands):
                        if b != a:
                            items.append(({**tests[i], "ref": ref}, f"candidate{a}", text, []))
                            where.append((i, a, b))
        rows = score_items(scorer, f"{mode}:{metric}", items, cache, counts)
        table: dict[int, dict[tuple[int, int], float]] = defaultdict(dict)
        for (i, a, b), row in zip(where, rows, strict=True):
            table[i][(a, b)] = row["score"]
        for i in idx:
            n = len(candidates[i])
            if mode == "qe_rerank":
                pick = qe_choice([table[i][(a, a)] for a in range(n)])
            else:
                pick = mbr_choice([[table[i].get((a, b), 0.0) for b in range(n)] for a in range(n)])
            chosen[i] = candidates[i][pick]
    return chosen
