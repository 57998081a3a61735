"""Quality-aware decoding (QE reranking, MBR) against hand-made candidates and sacreBLEU's own chrF, through the
score cache; the report's selection / held-out split and decoding table; the whole flow with ARPO, best_vs_all
and MBR (issue 18's command, on the miniature config)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sacrebleu.metrics import CHRF

from alma_r.config import ConfigError, load_config
from alma_r.models.evaluate.quality_aware import mbr_choice, qe_choice
from alma_r.models.score.cache import ScoreCache
from alma_r.models.score.scorers import ConsensusScorer, SacrebleuScorer
from alma_r.tasks.shared.quality_decoding import rerank
from alma_r.tasks.shared.report_sections import (
    decoding_section,
    metric_split_section,
    selection_only_gains,
)
from tests.test_flow_e2e import MINI, mini_config


def test_choice_rules_by_hand():
    assert qe_choice([0.2, 0.9, 0.9, 0.1]) == 1  # the first of equals: beam order
    # Mean utility against the others: row 0 (0.5 + 0.1) / 2 = 0.3, row 1 (0.5 + 0.9) / 2 = 0.7, row 2 0.45.
    utility = [[9, 0.5, 0.1], [0.5, 9, 0.9], [0.1, 0.8, 9]]
    assert mbr_choice(utility) == 1
    assert mbr_choice([[1.0]]) == 0
    with pytest.raises(ValueError):
        qe_choice([])


SEGMENT = {
    "id": "s1",
    "lp": "de-en",
    "src_lang": "de",
    "tgt_lang": "en",
    "src": "Der Hund schläft.",
    "ref": None,
}
CANDIDATES = ["The dog sleeps.", "The dog is sleeping.", "A dog sleeps.", "Cats run fast."]


def test_mbr_with_chrf_is_sacrebleus_expected_utility_and_cached(tmp_path):
    chrf = CHRF()
    n = len(CANDIDATES)
    expected = [
        sum(chrf.sentence_score(CANDIDATES[a], [CANDIDATES[b]]).score for b in range(n) if b != a) / (n - 1)
        for a in range(n)
    ]
    best = max(range(n), key=lambda a: expected[a])
    cache, counts = ScoreCache(tmp_path / "scores.sqlite"), {}
    pick = rerank(
        [SEGMENT], [CANDIDATES], "mbr", lambda lang: SacrebleuScorer("chrf", lang), "chrf", cache, counts
    )
    assert pick == [CANDIDATES[best]]
    assert counts["mbr:chrf/scored"] == n * (n - 1)
    again: dict = {}
    rerank([SEGMENT], [CANDIDATES], "mbr", lambda lang: SacrebleuScorer("chrf", lang), "chrf", cache, again)
    assert again["mbr:chrf/scored"] == 0 and again["mbr:chrf/from_cache"] == n * (n - 1)


def test_qe_rerank_with_consensus_chrf_and_a_prompt_over_the_limit(tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    scores = [
        s.score
        for s in ConsensusScorer().score(
            [
                {"src": SEGMENT["src"], "mt": c, "pseudo_refs": sorted(CANDIDATES[:a] + CANDIDATES[a + 1 :])}
                for a, c in enumerate(CANDIDATES)
            ]
        )
    ]
    picks = rerank(
        [SEGMENT, SEGMENT | {"id": "s2"}],
        [CANDIDATES, None],
        "qe_rerank",
        lambda lang: ConsensusScorer(),
        "consensus_chrf",
        cache,
        {},
    )
    assert picks == [CANDIDATES[qe_choice(scores)], None]
    assert picks[0] != "Cats run fast."  # the outlier agrees with nobody


def result(lp: str, system: str, metric: str, score: float, p: float | None = None) -> dict:
    return {
        "test_set": "wmt22",
        "lp": lp,
        "system": system,
        "metric": metric,
        "score": score,
        "signature": "sig",
        "n_segments": 10,
        "p_value": p,
    }


RESULTS = [
    result("de-en", "baseline", "chrf", 50.0),
    result("de-en", "cpo", "chrf", 53.0, 0.01),
    result("de-en", "baseline", "bleu", 20.0),
    result("de-en", "cpo", "bleu", 20.1, 0.40),
    result("en-de", "baseline", "chrf", 40.0),
    result("en-de", "cpo", "chrf", 42.0, 0.01),
    result("en-de", "baseline", "bleu", 15.0),
    result("en-de", "cpo", "bleu", 16.5, 0.02),
]


def test_a_direction_where_only_the_selection_metrics_improve_is_flagged():
    # de-en: chrF (selected the pairs) +3 significant, BLEU (held out) +0.1 not: flagged. en-de: both: not.
    assert selection_only_gains(RESULTS, ["chrf", "consensus_chrf"]) == [("wmt22", "de-en")]
    section = metric_split_section(RESULTS, ["chrf", "consensus_chrf"])
    assert "| wmt22 | de-en | chrF +3.00† | BLEU +0.10 | ⚠ selection metrics only |" in section
    assert "| wmt22 | en-de | chrF +2.00† | BLEU +1.50† |  |" in section
    assert selection_only_gains(RESULTS, ["bleu", "chrf"]) == []  # nothing held out: nothing to compare
    assert "no held-out metric" in metric_split_section(RESULTS, ["bleu", "chrf"])


def test_decoding_table_shows_each_decoding_against_beam():
    rows = RESULTS + [
        result("de-en", "cpo+qe_rerank", "chrf", 54.0),
        result("de-en", "cpo+mbr", "chrf", 52.5),
    ]
    table = decoding_section(rows)
    assert "| wmt22 | de-en | chrF | 53.00 | 54.00 (+1.00) | 52.50 (-0.50) |" in table
    assert decoding_section(RESULTS) == ""  # beam only: no section


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["evaluate.decoding=qe_rerank", "evaluate.qe_metric=chrf"], "evaluate.qe_metric"),
        (["evaluate.decoding=mbr", "evaluate.mbr_utility=kiwi_22"], "evaluate.mbr_utility"),
    ],
)
def test_a_reranking_metric_of_the_wrong_kind_is_a_config_error(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


def test_flow_with_arpo_best_vs_all_and_mbr(tmp_path, prefect_harness):
    from alma_r.flows.build_alma_r import build_alma_r

    extra = [
        "train.loss_type=arpo",
        "select.pairs=best_vs_all",
        "evaluate.decoding=mbr",
        "evaluate.candidates=3",
    ]
    run_dir = Path(build_alma_r(config_path=str(mini_config(tmp_path)), overrides=[*MINI, *extra]))
    pairs = pq.read_table(run_dir / "select" / "pairs.parquet").to_pylist()
    per_source: dict[str, float] = {}
    for p in pairs:
        per_source[p["segment_id"]] = per_source.get(p["segment_id"], 0.0) + p["weight"]
    assert len(pairs) > len(per_source)  # more than one pair per source
    assert all(w == pytest.approx(1.0) for w in per_source.values())
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert summary["settings"]["loss_type"] == "arpo"
    report = (run_dir / "report.md").read_text()
    assert "| test set | direction | metric | beam | QE-reranked | MBR |" in report
    assert "## Selection metrics vs held-out metrics" in report and "held-out metrics" in report
    systems = {r["system"] for r in pq.read_table(run_dir / "evaluate" / "eval.parquet").to_pylist()}
    assert {"cpo", "cpo+qe_rerank", "cpo+mbr"} <= systems


def test_n_best_within_the_beam_width_is_one_search_giving_the_beam_output(tiny_model_dir, tmp_path):
    # candidates <= num_beams: the beam output is read off the n best (one search); it must be what the plain
    # beam search gives, and the first of the candidates.
    from alma_r.tasks.evaluate import translate_test_sets

    cfg = load_config(
        None, ["evaluate.num_beams=3", "evaluate.max_new_tokens=8", f"run.root={tmp_path / 'runs'}"]
    )
    tests = [
        SEGMENT | {"id": f"s{i}", "src": src} for i, src in enumerate(["Der Hund schläft.", "Guten Tag."])
    ]
    plain, _, none = translate_test_sets(cfg, tests, str(tiny_model_dir), None, "cpo")
    hyps, _, beams = translate_test_sets(cfg, tests, str(tiny_model_dir), None, "cpo", n_best=3)
    assert none == [None, None] and hyps == plain == [b[0] for b in beams] and all(len(b) == 3 for b in beams)
