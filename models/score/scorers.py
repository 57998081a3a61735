"""Segment scorers behind one interface, and sacreBLEU corpus scores with their signatures.

A scorer takes items {"src", "mt", "ref"?, "pseudo_refs"?} and returns one `SegmentScore` per item:
- `SacrebleuScorer` (chrf, bleu): reference-based string metrics; the reference scores itself 100.
- `ConsensusScorer` (consensus_chrf): reference-free, needs no model: a candidate's mean chrF against the
  other candidates of the same source (MBR-style), so the reference is not trivially the best on CPU runs.
- `CometScorer` (models/score/comet_scorer.py): any COMET checkpoint (XCOMET-XXL, KIWI-XXL, COMET-22, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass
class SegmentScore:
    score: float
    error_spans: list[dict] | None = None


def bleu_tokenize(tgt_lang: str) -> str:
    """sacrebleu's conventional tokenizer for the target language (WMT practice)."""
    return {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}.get(tgt_lang, "13a")


def _metric(name: str, tgt_lang: str, sentence: bool):
    if name == "chrf":
        return CHRF()
    if name == "bleu":
        return BLEU(tokenize=bleu_tokenize(tgt_lang), effective_order=sentence)
    raise ValueError(f"unknown string metric '{name}' (known: chrf, bleu)")


def sentence_scores(
    name: str, hypotheses: list[str], references: list[str], tgt_lang: str
) -> tuple[list[float], str]:
    """Per-segment scores and the metric's signature."""
    metric = _metric(name, tgt_lang, sentence=True)
    scores = [metric.sentence_score(h, [r]).score for h, r in zip(hypotheses, references, strict=True)]
    return scores, str(metric.get_signature())


def corpus_score(name: str, hypotheses: list[str], references: list[str], tgt_lang: str) -> tuple[float, str]:
    """The corpus score as sacrebleu's CLI computes it, and its signature."""
    metric = _metric(name, tgt_lang, sentence=False)
    return metric.corpus_score(hypotheses, [references]).score, str(metric.get_signature())


class SacrebleuScorer:
    uses_reference = True

    def __init__(self, metric: str, tgt_lang: str):
        self.metric, self.tgt_lang = metric, tgt_lang
        self._impl = _metric(metric, tgt_lang, sentence=True)
        self._impl.sentence_score(
            "a", ["a"]
        )  # sacrebleu knows the reference count (part of the signature) only then
        self.model_id = str(self._impl.get_signature())
        self.segments_scored = 0

    def score(self, items: list[dict]) -> list[SegmentScore]:
        self.segments_scored += len(items)
        return [SegmentScore(self._impl.sentence_score(it["mt"], [it["ref"]]).score) for it in items]


class ConsensusScorer:
    """Reference-free: mean sentence chrF of a candidate against the other candidates of its source."""

    uses_reference = False

    def __init__(self):
        self._chrf = CHRF()
        self._chrf.sentence_score("a", ["a"])
        self.model_id = f"consensus-chrf|{self._chrf.get_signature()}"
        self.segments_scored = 0

    def score(self, items: list[dict]) -> list[SegmentScore]:
        self.segments_scored += len(items)
        out = []
        for it in items:
            others = it.get("pseudo_refs") or []
            value = (
                sum(self._chrf.sentence_score(it["mt"], [o]).score for o in others) / len(others)
                if others
                else 0.0
            )
            out.append(SegmentScore(value))
        return out
