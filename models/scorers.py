"""String metrics from sacrebleu, sentence- and corpus-level, with their signatures.

chrF is the CPU stand-in for the paper's KIWI-XXL/XCOMET-XXL; being reference-based it scores the reference
itself 100, so the reference is always the chosen side until reference-free scorers arrive.
"""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF


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
