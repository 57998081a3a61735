"""The score stage: every distinct request scored once (across systems and reruns), consensus chrF by hand,
and bad inputs stopped with the segments and systems named."""

from __future__ import annotations

import math

import pytest
from sacrebleu.metrics import CHRF

from alma_r.config import load_config
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, REFERENCE, SCORES, SEGMENTS
from alma_r.models.score import scorers
from alma_r.models.score.cache import ScoreCache, score_key
from alma_r.models.score.scorers import SegmentScore
from alma_r.tasks.score import run_score
from alma_r.tasks.shared.scoring import ScoringError

SEGS = [
    {
        "id": "s1",
        "lp": "de-en",
        "src_lang": "de",
        "tgt_lang": "en",
        "src": "Guten Morgen",
        "ref": "Good morning",
        "origin": "t",
        "split": "train",
    },
    {
        "id": "s2",
        "lp": "de-en",
        "src_lang": "de",
        "tgt_lang": "en",
        "src": "Danke",
        "ref": "Thank you",
        "origin": "t",
        "split": "train",
    },
]


def cand(segment_id, system, text):
    return {
        "segment_id": segment_id,
        "lp": "de-en",
        "system": system,
        "hypothesis": text,
        "model_id": "m",
        "adapter": None,
        "generation": "{}",
    }


@pytest.fixture
def inputs(tmp_path):
    segments = write_table(SEGS, tmp_path / "segments.parquet", SEGMENTS)
    a = write_table(
        [cand("s1", "a", "Good morning"), cand("s2", "a", "Thanks")], tmp_path / "a.parquet", CANDIDATES
    )
    b = write_table(
        [cand("s1", "b", "Morning good"), cand("s2", "b", "")], tmp_path / "b.parquet", CANDIDATES
    )
    return segments, [a, b]


class Counting:
    """Counts the segments each scorer class is asked to score."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for cls in (scorers.SacrebleuScorer, scorers.ConsensusScorer):
            real = cls.score

            def counted(scorer, items, _real=real):
                self.calls += len(items)
                return _real(scorer, items)

            monkeypatch.setattr(cls, "score", counted)


def test_each_distinct_request_is_scored_once_then_cached(inputs, tmp_path, monkeypatch):
    segments, candidates = inputs
    cfg = load_config(overrides=["score.metrics=[chrf, consensus_chrf]"])
    counter = Counting(monkeypatch)
    outputs, counts = run_score(cfg, segments, candidates, tmp_path / "out1", tmp_path / "cache.sqlite")
    # 6 requests (reference + 2 systems x 2 segments); system a's "Good morning" equals the reference of s1.
    assert counts["chrf/requests"] == 6 and counts["chrf/distinct"] == 5 and counts["chrf/scored"] == 5
    assert counts["chrf/from_cache"] == 0
    first = counter.calls
    outputs2, counts2 = run_score(cfg, segments, candidates, tmp_path / "out2", tmp_path / "cache.sqlite")
    assert counter.calls == first  # zero scorer calls the second time
    assert counts2["chrf/scored"] == 0 and counts2["chrf/from_cache"] == 5
    for metric in ("chrf", "consensus_chrf"):
        assert read_rows(outputs[f"scores/{metric}"], SCORES) == read_rows(
            outputs2[f"scores/{metric}"], SCORES
        )


def test_chrf_and_consensus_values_by_hand(inputs, tmp_path):
    segments, candidates = inputs
    cfg = load_config(overrides=["score.metrics=[chrf, consensus_chrf]"])
    outputs, _ = run_score(cfg, segments, candidates, tmp_path / "out", tmp_path / "cache.sqlite")
    chrf = {(r["segment_id"], r["system"]): r for r in read_rows(outputs["scores/chrf"], SCORES)}
    assert chrf[("s1", REFERENCE)]["score"] == 100.0 and chrf[("s1", "a")]["score"] == 100.0
    assert chrf[("s2", "b")]["flag"] == "empty_hypothesis" and chrf[("s2", "b")]["score"] == 0.0
    assert chrf[("s2", "a")]["flag"] is None
    metric = CHRF()
    expected = metric.sentence_score("Thanks", ["Thank you"]).score
    assert chrf[("s2", "a")]["score"] == pytest.approx(expected)
    consensus = {
        (r["segment_id"], r["system"]): r["score"]
        for r in read_rows(outputs["scores/consensus_chrf"], SCORES)
    }
    # s1: "Morning good" against the other two candidates ("Good morning" twice).
    by_hand = (metric.sentence_score("Morning good", ["Good morning"]).score * 2) / 2
    assert consensus[("s1", "b")] == pytest.approx(by_hand)
    by_hand_ref = (
        metric.sentence_score("Good morning", ["Good morning"]).score
        + metric.sentence_score("Good morning", ["Morning good"]).score
    ) / 2
    assert consensus[("s1", REFERENCE)] == pytest.approx(by_hand_ref)


def test_a_system_missing_segments_is_named(tmp_path):
    segments = write_table(SEGS, tmp_path / "segments.parquet", SEGMENTS)
    a = write_table([cand("s1", "a", "x"), cand("s2", "a", "y")], tmp_path / "a.parquet", CANDIDATES)
    b = write_table([cand("s1", "b", "x")], tmp_path / "b.parquet", CANDIDATES)
    with pytest.raises(ScoringError, match=r"system 'b' has no candidate for 1 segment\(s\).*'s2'"):
        run_score(load_config(), segments, [a, b], tmp_path / "out", tmp_path / "c.sqlite")
    c = write_table([cand("s9", "c", "x")], tmp_path / "c.parquet", CANDIDATES)
    with pytest.raises(ScoringError, match=r"unknown segments.*'s9'"):
        run_score(load_config(), segments, [c], tmp_path / "out", tmp_path / "c.sqlite")


def test_a_nan_score_is_refused_with_segment_and_system(inputs, tmp_path, monkeypatch):
    segments, candidates = inputs

    def broken(self, items):
        return [SegmentScore(math.nan if it["mt"] == "Thanks" else 1.0) for it in items]

    monkeypatch.setattr(scorers.SacrebleuScorer, "score", broken)
    with pytest.raises(ScoringError, match=r"gave nan for segment/system \[\('s2', 'a'\)\]"):
        run_score(load_config(), segments, candidates, tmp_path / "out", tmp_path / "cache.sqlite")
    # Nothing untrustworthy was cached.
    assert (
        ScoreCache(tmp_path / "cache.sqlite").get_many([score_key("x", "Danke", "Thanks", "Thank you")]) == {}
    )


def test_comet_metrics_through_the_stage_then_zero_forward_passes(inputs, tmp_path, monkeypatch):
    pytest.importorskip("comet")
    from alma_r.models.score import comet_scorer
    from alma_r.models.score.tiny_comet import build_tiny_comet

    texts = [s["src"] for s in SEGS] + [s["ref"] for s in SEGS] + ["Good morning", "Thanks", "Morning good"]
    kiwi = build_tiny_comet(tmp_path / "kiwi", "kiwi", texts)
    xcomet = build_tiny_comet(tmp_path / "xcomet", "xcomet", texts)
    cfg = load_config(
        overrides=[
            "score.metrics=[kiwi_xxl, xcomet_xxl]",
            f"score.comet_models={{kiwi_xxl: {{model: '{kiwi}'}}, xcomet_xxl: {{model: '{xcomet}', reference: false}}}}",
        ]
    )
    segments, candidates = inputs
    scored, loads = [], []
    real_score, real_load = comet_scorer.CometScorer.score, comet_scorer.CometScorer._load

    def counting_score(self, items):
        scored.append(len(items))
        return real_score(self, items)

    def counting_load(self):
        loads.append(self.model_id)
        return real_load(self)

    monkeypatch.setattr(comet_scorer.CometScorer, "score", counting_score)
    monkeypatch.setattr(comet_scorer.CometScorer, "_load", counting_load)
    outputs, counts = run_score(cfg, segments, candidates, tmp_path / "out1", tmp_path / "cache.sqlite")
    assert scored == [5, 5] and counts["xcomet_xxl/scored"] == 5
    rows = read_rows(outputs["scores/xcomet_xxl"], SCORES)
    assert len(rows) == 6 and all(r["error_spans"] is not None for r in rows)
    assert {r["model_id"] for r in rows} == {str(xcomet)}
    scored.clear()
    loads.clear()
    outputs2, counts2 = run_score(cfg, segments, candidates, tmp_path / "out2", tmp_path / "cache.sqlite")
    assert scored == [] and loads == []  # all from the cache: no forward pass, not even a model load
    assert counts2["kiwi_xxl/from_cache"] == 5
    assert read_rows(outputs2["scores/kiwi_xxl"], SCORES) == read_rows(outputs["scores/kiwi_xxl"], SCORES)


def test_two_worker_processes_give_the_single_process_scores(inputs, tmp_path):
    pytest.importorskip("comet")
    from alma_r.models.score.tiny_comet import build_tiny_comet

    texts = [s["src"] for s in SEGS] + [s["ref"] for s in SEGS] + ["Good morning", "Thanks", "Morning good"]
    kiwi = build_tiny_comet(tmp_path / "kiwi", "kiwi", texts)
    segments, candidates = inputs
    results = {}
    for processes in (1, 2):
        cfg = load_config(
            overrides=[
                "score.metrics=[kiwi_xxl]",
                f"score.comet_models={{kiwi_xxl: {{model: '{kiwi}'}}}}",
                f"score.processes={processes}",
            ]
        )
        outputs, counts = run_score(
            cfg, segments, candidates, tmp_path / f"out{processes}", tmp_path / f"cache{processes}.sqlite"
        )
        assert counts["kiwi_xxl/scored"] == 5
        results[processes] = [r["score"] for r in read_rows(outputs["scores/kiwi_xxl"], SCORES)]
    assert results[2] == pytest.approx(results[1], abs=1e-6)


# ------------------------------------------------------------------------ published: metrics (ingest's scores)

PUBLISHED_CFG = {
    # a source that carries kiwi: what makes `published:kiwi` a valid metric
    "ingest": {
        "sources": [
            {
                "kind": "hf_dataset",
                "name": "t",
                "dataset": "org/preference",
                "pair": "de-en",
                "directions": ["de-en"],
                "systems": {"a": "a", "b": "b"},
                "published_scores": ["kiwi"],
            }
        ]
    },
    "score": {"metrics": ["published:kiwi"]},
}
PUBLISHED = {
    ("s1", REFERENCE): 0.9,
    ("s1", "a"): 0.8,
    ("s1", "b"): 0.1,
    ("s2", REFERENCE): 0.7,
    ("s2", "a"): 0.6,
    ("s2", "b"): 0.2,
}
INGESTED = {("s1", "a"): "Good morning", ("s2", "a"): "Thanks", ("s1", "b"): "Morning good", ("s2", "b"): ""}


def published_tables(tmp_path, scores=PUBLISHED, texts=INGESTED):
    from alma_r.data.schemas import INGESTED_TRANSLATIONS, PUBLISHED_SCORES

    published = write_table(
        [
            {
                "segment_id": s,
                "lp": "de-en",
                "system": system,
                "metric": "published:kiwi",
                "score": v,
                "origin": "t",
            }
            for (s, system), v in scores.items()
        ],
        tmp_path / "published_scores.parquet",
        PUBLISHED_SCORES,
    )
    ingested = write_table(
        [
            {"segment_id": s, "lp": "de-en", "system": system, "hypothesis": h, "origin": "t"}
            for (s, system), h in texts.items()
        ],
        tmp_path / "ingested_translations.parquet",
        INGESTED_TRANSLATIONS,
    )
    return published, ingested


def test_published_metrics_are_read_from_ingest_not_computed(inputs, tmp_path, monkeypatch):
    from alma_r.config import RunConfig
    from alma_r.tasks.shared import scoring

    def no_model(*args):
        raise AssertionError("a published metric ran a scorer")

    monkeypatch.setattr(scoring, "make_scorer", no_model)  # where the stage's LanguageScorers builds them
    segments, candidates = inputs
    published, ingested = published_tables(tmp_path)
    cfg = RunConfig.model_validate(PUBLISHED_CFG)
    outputs, counts = run_score(
        cfg,
        segments,
        candidates,
        tmp_path / "out",
        tmp_path / "c.sqlite",
        published=published,
        ingested=ingested,
    )
    rows = read_rows(outputs["scores/published:kiwi"], SCORES)
    assert [(r["segment_id"], r["system"], r["score"]) for r in rows] == [
        (s, system, PUBLISHED[(s, system)]) for s in ("s1", "s2") for system in (REFERENCE, "a", "b")
    ]
    assert rows[-1]["flag"] == "empty_hypothesis" and counts["published:kiwi/published"] == 6


@pytest.mark.parametrize(
    "scores, texts, published, problem",
    [
        (
            {k: v for k, v in PUBLISHED.items() if k != ("s2", "b")},
            INGESTED,
            True,
            r"^metric 'published:kiwi': no published score for system 'b' on segment 's2'; the dataset carries them "
            r"for systems \['a', 'b', 'reference'\]$",
        ),
        (
            PUBLISHED,
            {**INGESTED, ("s1", "a"): "Good day"},
            True,
            r"^metric 'published:kiwi': system 'a' on segment 's1' is not the translation the dataset published",
        ),
        (PUBLISHED, INGESTED, False, r"^metric 'published:kiwi': ingest wrote no published scores"),
    ],
)
def test_a_candidate_without_its_published_score_is_named(
    inputs, tmp_path, scores, texts, published, problem
):
    from alma_r.config import RunConfig

    segments, candidates = inputs
    table, ingested = published_tables(tmp_path, scores, texts)
    with pytest.raises(ScoringError, match=problem):
        run_score(
            RunConfig.model_validate(PUBLISHED_CFG),
            segments,
            candidates,
            tmp_path / "out",
            tmp_path / "c.sqlite",
            published=table if published else None,
            ingested=ingested,
        )


def test_published_metric_names_are_checked_against_the_sources():
    from alma_r.config import ConfigError, RunConfig

    with pytest.raises(ValueError, match=r"unknown metric 'published:'"):
        RunConfig.model_validate({**PUBLISHED_CFG, "score": {"metrics": ["published:"]}})
    with pytest.raises(
        ValueError,
        match=r"score.metrics 'published:xcomet' reads published scores, but no "
        r"hf_dataset source lists 'xcomet' .*they list \['kiwi'\]",
    ):
        RunConfig.model_validate({**PUBLISHED_CFG, "score": {"metrics": ["published:xcomet"]}})
    with pytest.raises(ConfigError, match=r"no hf_dataset source lists 'kiwi'"):
        load_config(overrides=["score.metrics=[published:kiwi]"])
