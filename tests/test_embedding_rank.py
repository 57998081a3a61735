"""The ranking signal: cosine similarity of mean-pooled embeddings to the ground truth (a tiny local model)."""

from __future__ import annotations

import math

import pytest
import torch

from alma_r.models import synthetic
from alma_r.models.sequence.embedding_rank import EmbeddingRanker, ranking_from_similarities

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


@pytest.fixture(scope="module")
def ranker(tmp_path_factory):
    folder = synthetic.build_model(tmp_path_factory.mktemp("emb") / "model", seed=3)
    return EmbeddingRanker(str(folder), batch_size=3)  # batches of 3: padding inside batches is exercised


def _cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _alone(ranker: EmbeddingRanker, text: str) -> list[float]:
    """The embedding of one text run on its own (no padding): the mean of its last hidden states."""
    ids = ranker.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = ranker.model(input_ids=ids).last_hidden_state[0]  # (T, H)
    return (hidden.sum(0) / hidden.shape[0]).tolist()


GROUND_TRUTH = ["THE DOG BIG SLEEPS", "A CAT LIKES", "SOME OWL SEES EVERY FOX"]
NEGATIVES = [
    ["THE DOG SLEEPS", "THE DOG BIG SLEEPS", "A WOLF TALL SWIMS AGAIN NOW", "SLEEPS"],
    ["LIKES", "A CAT TIGER LIKES", "EVERY KING OLD QUEEN GREETS SLOWLY", "A"],
    ["SOME OWL SEES", "FOX", "SOME OWL EVERY FOX SEES", "THE THE THE"],
]


def test_rank_matches_an_independent_computation(ranker):
    ranking = ranker.rank(GROUND_TRUTH, NEGATIVES)
    assert ranking.shape == (3, 5) and ranking.dtype == torch.long
    for row, (gt, negs) in enumerate(zip(GROUND_TRUTH, NEGATIVES, strict=True)):
        e_gt = _alone(ranker, gt)
        sims = [_cosine(_alone(ranker, t), e_gt) for t in negs]
        want = [0] + [1 + j for j in sorted(range(len(negs)), key=lambda j: -sims[j])]
        assert ranking[row].tolist() == want
        got = ranker.similarities([gt], [negs])[0].tolist()
        assert got == pytest.approx(sims, abs=1e-5)
    # the negative equal to the ground truth has similarity 1 and comes right after it
    assert ranking[0, 1].item() == 2


def test_embeddings_ignore_padding(ranker):
    texts = ["A", "THE DOG BIG SEES A CAT QUICKLY", "EVERY KING"]
    batched = ranker.embed(texts)  # one batch of 3, padded to the longest
    for text, emb in zip(texts, batched, strict=True):
        assert emb.tolist() == pytest.approx(_alone(ranker, text), abs=1e-5)


def test_ranking_from_similarities_breaks_ties_in_column_order():
    sims = torch.tensor([[0.1, 0.9, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert ranking_from_similarities(sims).tolist() == [[0, 2, 4, 1, 3], [0, 1, 2, 3, 4]]


def test_uneven_negatives_are_refused(ranker):
    with pytest.raises(ValueError, match="same number"):
        ranker.similarities(["A", "B"], [["A"], ["A", "B"]])
