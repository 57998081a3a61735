"""Quality-aware decoding's choice among a prompt's candidates, as pure functions of scores.

QE reranking (e.g. Fernandes et al., NAACL 2022): the candidate with the highest reference-free quality estimate.
Minimum-Bayes-risk decoding (Kumar & Byrne, 2004; for NMT e.g. Freitag et al., TACL 2022): the candidate with
the highest expected utility against the others, each other candidate standing in for a reference sampled from
the model: argmax_i mean_{j != i} U(c_i, c_j). Ties go to the earlier candidate (beam order: the beam's best).
"""

from __future__ import annotations


def qe_choice(scores: list[float]) -> int:
    """The index of the best-estimated candidate (the first of equals)."""
    if not scores:
        raise ValueError("no candidates to rerank")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mbr_choice(utility: list[list[float]]) -> int:
    """utility[i][j] = U(candidate i, pseudo-reference j), an n x n table (the diagonal is not read). The index
    of the candidate with the highest mean utility against the n - 1 others; one candidate is its own choice."""
    n = len(utility)
    if n == 0:
        raise ValueError("no candidates for MBR")
    if n == 1:
        return 0
    expected = [sum(utility[i][j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return qe_choice(expected)
