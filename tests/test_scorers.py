"""String metrics (models/score/scorers.py) agree with sacrebleu's own command line on the bundled sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alma_r.config import SAMPLE_DIR
from alma_r.models.score.scorers import bleu_tokenize, corpus_score, sentence_scores

SACREBLEU = Path(sys.executable).parent / "sacrebleu"

# (direction, reference file, hypothesis file, target language)
SAMPLES = [
    ("de-en", SAMPLE_DIR / "wmt22/deen/test.de-en.en", SAMPLE_DIR / "alma13br/deen/test.de-en.en", "en"),
    ("en-de", SAMPLE_DIR / "wmt22/ende/test.en-de.de", SAMPLE_DIR / "alma13br/ende/test.en-de.de", "de"),
]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def cli_scores(ref: Path, hyp: Path) -> tuple[float, float]:
    """BLEU and chrF from `sacrebleu REF -i HYP -m bleu chrf -b -w 4` (scores only, 4 decimals)."""
    out = subprocess.run(
        [str(SACREBLEU), str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-b", "-w", "4"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    bleu, chrf = json.loads(out.stdout)
    return float(bleu), float(chrf)


@pytest.fixture(scope="module")
def cli():
    if not SACREBLEU.is_file():
        pytest.skip(f"no sacrebleu CLI at {SACREBLEU}")
    return {lp: cli_scores(ref, hyp) for lp, ref, hyp, _ in SAMPLES}


@pytest.mark.parametrize(("lp", "ref", "hyp", "tgt"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_corpus_scores_equal_the_cli(cli, lp, ref, hyp, tgt):
    refs, hyps = lines(ref), lines(hyp)
    assert len(refs) == len(hyps) == 100
    cli_bleu, cli_chrf = cli[lp]
    assert 0 < cli_bleu < 100 and 0 < cli_chrf < 100

    bleu, bleu_sig = corpus_score("bleu", hyps, refs, tgt)
    chrf, chrf_sig = corpus_score("chrf", hyps, refs, tgt)
    assert round(bleu, 4) == cli_bleu
    assert round(chrf, 4) == cli_chrf
    assert "tok:13a" in bleu_sig.split("|")
    assert "nc:6" in chrf_sig.split("|")
    assert "nrefs:1" in bleu_sig.split("|") and "nrefs:1" in chrf_sig.split("|")


def test_corpus_scores_are_not_symmetric_by_accident():
    # swapping hypothesis and reference changes BLEU (brevity penalty): the arguments are in the right order
    _, ref, hyp, tgt = SAMPLES[0]
    refs, hyps = lines(ref), lines(hyp)
    assert corpus_score("bleu", hyps, refs, tgt)[0] != pytest.approx(corpus_score("bleu", refs, hyps, tgt)[0])


@pytest.mark.parametrize(
    ("lang", "tok"),
    # sacrebleu's own tokenizers for Chinese and Japanese, 13a for every other language
    [("zh", "zh"), ("ja", "ja-mecab"), *((lang, "13a") for lang in ["en", "de", "cs", "ru", "is"])],
)
def test_bleu_tokenizer_by_target_language(lang, tok):
    assert bleu_tokenize(lang) == tok


def test_chinese_bleu_signature_uses_the_zh_tokenizer():
    hyps, refs = ["我喜欢猫。", "今天天气很好。"], ["我喜欢狗。", "今天天气很好。"]
    score, sig = corpus_score("bleu", hyps, refs, "zh")
    assert "tok:zh" in sig.split("|")
    assert 0 < score < 100


def test_sentence_chrf_of_a_reference_against_itself_is_100():
    refs = lines(SAMPLES[0][1])[:20]
    scores, sig = sentence_scores("chrf", refs, refs, "en")
    assert scores == [100.0] * 20
    assert "nc:6" in sig.split("|")


def test_sentence_scores_rank_a_worse_hypothesis_lower():
    refs = ["The cat sat on the mat.", "It is raining today."]
    hyps = ["The cat sat on the mat.", "Completely unrelated words here."]
    chrf, _ = sentence_scores("chrf", hyps, refs, "en")
    bleu, bleu_sig = sentence_scores("bleu", hyps, refs, "en")
    assert chrf[0] == 100.0 and 0 <= chrf[1] < 20
    assert bleu[0] == pytest.approx(100.0) and bleu[1] < 20
    assert "eff:yes" in bleu_sig.split("|")  # sentence BLEU uses effective order


def test_sentence_scores_need_aligned_lists():
    with pytest.raises(ValueError):
        sentence_scores("chrf", ["a", "b"], ["a"], "en")


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown string metric"):
        corpus_score("comet", ["a"], ["a"], "en")
