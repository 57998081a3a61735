"""The learning check's decoding comparison: a model's held-out translations by greedy search, by beam search
(the best of N beams), by QE reranking of those N beams with the oracle (the task's perfect reference-free
metric, as KIWI would be) and by MBR over them with chrF as the utility, through the project's own reranking
(tasks/shared/quality_decoding.py) and score cache. MBR with the oracle as its utility is QE reranking with the
oracle: the oracle reads the source, never the pseudo-reference, so each candidate's expected utility is its
own score; the table does not repeat it."""

from __future__ import annotations

from pathlib import Path

from alma_r.models import synthetic
from alma_r.models.generate.hf_backend import Decoding, generate_n_best, generate_translations
from alma_r.models.score.cache import ScoreCache
from alma_r.models.score.scorers import SacrebleuScorer
from alma_r.tasks.shared.quality_decoding import rerank

BEAMS = 4
DECODINGS = ("greedy", "beam", "qe_rerank (oracle)", "mbr (chrF)")


def compare_decodings(
    model, tokenizer, test: list[synthetic.Segment], work_dir: Path, batch_size: int = 250
) -> dict[str, dict[str, float]]:
    """evaluate_outputs(...) of each decoding of DECODINGS, on the held-out sources."""
    prompts, sources = [s.prompt for s in test], [s.src for s in test]
    rows = [s.as_row() for s in test]
    greedy = generate_translations(model, tokenizer, prompts, Decoding(max_new_tokens=16), batch_size, 64)
    beams = generate_n_best(model, tokenizer, prompts, Decoding(max_new_tokens=16), BEAMS, batch_size, 64)
    cache, counts = ScoreCache(Path(work_dir) / "cache" / "decoding.sqlite"), {}
    qe = rerank(rows, beams, "qe_rerank", lambda _: synthetic.OracleScorer(), "oracle", cache, counts)
    mbr = rerank(rows, beams, "mbr", lambda lang: SacrebleuScorer("chrf", lang), "chrf", cache, counts)
    outputs = {
        "greedy": greedy,
        "beam": [b[0] if b else None for b in beams],
        "qe_rerank (oracle)": qe,
        "mbr (chrF)": mbr,
    }
    return {name: synthetic.evaluate_outputs(sources, outputs[name]) for name in DECODINGS}
