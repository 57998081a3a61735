"""The preference-pair rule (tasks/shared/selection.py), table-driven with hand-made scores and hand-computed answers."""

from __future__ import annotations

import pytest

from alma_r.config import ConfigError, load_config
from alma_r.data.schemas import REFERENCE
from alma_r.tasks.shared.selection import labelled_segments, select_pairs, selection_stats, zscores

SRC = {"de-en": "Hallo Welt.", "en-de": "Hello world.", "cs-en": "Ahoj světe."}
PROMPT = {
    "de-en": "Translate this from German to English:\nGerman: Hallo Welt.\nEnglish:",
    "en-de": "Translate this from English to German:\nEnglish: Hello world.\nGerman:",
    "cs-en": "Translate this from Czech to English:\nCzech: Ahoj světe.\nEnglish:",
}


def segment(sid: str, lp: str = "de-en") -> dict:
    src_lang, tgt_lang = lp.split("-")
    return {
        "id": sid,
        "lp": lp,
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "src": SRC[lp],
        "ref": None,
        "origin": "test",
        "split": "train",
    }


def build(sid: str, candidates: dict[str, tuple[str, dict[str, float]]]):
    """{system: (text, {metric: score})} -> the texts and scores dicts select_pairs takes."""
    texts = {(sid, system): text for system, (text, _) in candidates.items()}
    scores = {
        (sid, system, m): v for system, (_, by_metric) in candidates.items() for m, v in by_metric.items()
    }
    return texts, scores


def run_one(candidates, systems, metrics, min_margin=0.0, lp="de-en"):
    texts, scores = build("s1", candidates)
    return select_pairs([segment("s1", lp)], texts, scores, systems, metrics, min_margin)


# ------------------------------------------------------------------------------------------------ pairs


def test_chosen_is_the_highest_mean_and_rejected_the_lowest():
    # means: reference (90+50)/2 = 70, greedy (100+20)/2 = 60, sample (30+10)/2 = 20.
    # greedy has the best chrF alone, but the mean decides.
    pairs, dropped = run_one(
        {
            "sample": ("Hi planet.", {"chrf": 30.0, "bleu": 10.0}),
            "greedy": ("Hello, world.", {"chrf": 100.0, "bleu": 20.0}),
            REFERENCE: ("Hello world.", {"chrf": 90.0, "bleu": 50.0}),
        },
        systems=["greedy", "sample"],
        metrics=["chrf", "bleu"],
    )
    assert dropped == []
    assert pairs == [
        {
            "prompt": "Translate this from German to English:\nGerman: Hallo Welt.\nEnglish:",
            "chosen": "Hello world.",
            "rejected": "Hi planet.",
            "segment_id": "s1",
            "lp": "de-en",
            "chosen_system": REFERENCE,
            "rejected_system": "sample",
            "chosen_score": 70.0,
            "rejected_score": 20.0,
            "margin": 50.0,
            "weight": 1.0,
        }
    ]


def test_a_system_can_beat_the_reference():
    pairs, _ = run_one(
        {
            REFERENCE: ("Ref.", {"kiwi": 0.7}),
            "a": ("A text.", {"kiwi": 0.9}),
            "b": ("B text.", {"kiwi": 0.5}),
        },
        systems=["a", "b"],
        metrics=["kiwi"],
    )
    (p,) = pairs
    assert (p["chosen_system"], p["rejected_system"]) == ("a", "b")
    assert (p["chosen"], p["rejected"]) == ("A text.", "B text.")
    assert p["margin"] == pytest.approx(0.4)


def test_only_the_selection_metrics_count():
    # bleu would flip the order, but only chrf is selected
    pairs, _ = run_one(
        {
            REFERENCE: ("Ref.", {"chrf": 60.0, "bleu": 0.0}),
            "a": ("A.", {"chrf": 80.0, "bleu": 0.0}),
            "b": ("B.", {"chrf": 10.0, "bleu": 100.0}),
        },
        systems=["a", "b"],
        metrics=["chrf"],
    )
    assert (pairs[0]["chosen_system"], pairs[0]["rejected_system"]) == ("a", "b")
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"], pairs[0]["margin"]) == (80.0, 10.0, 70.0)


# Ties: the reference first, then systems in config order ("zeta" before "alpha", so neither alphabetical
# nor dict order can pass by accident: the dicts below list alpha first).
TIES = [
    # (case, {system: score}, chosen, rejected)
    ("top: reference ties a system", {"alpha": 80.0, "zeta": 10.0, REFERENCE: 80.0}, REFERENCE, "zeta"),
    ("top: two systems tie", {"alpha": 80.0, "zeta": 80.0, REFERENCE: 50.0}, "zeta", REFERENCE),
    (
        "top: all but one tie",
        {"alpha": 70.0, "zeta": 70.0, REFERENCE: 70.0, "omega": 1.0},
        REFERENCE,
        "omega",
    ),
    (
        "bottom: reference ties a system",
        {"alpha": 10.0, "zeta": 90.0, REFERENCE: 10.0},
        "zeta",
        REFERENCE,
    ),
    ("bottom: two systems tie", {"alpha": 10.0, "zeta": 10.0, REFERENCE: 90.0}, REFERENCE, "zeta"),
    (
        "bottom: later systems tie",
        {"alpha": 5.0, "omega": 5.0, "zeta": 60.0, REFERENCE: 50.0},
        "zeta",
        "omega",
    ),
]


@pytest.mark.parametrize(("case", "by_system", "chosen", "rejected"), TIES, ids=[t[0] for t in TIES])
def test_ties(case, by_system, chosen, rejected):
    systems = ["zeta", "omega", "alpha"]
    candidates = {s: (f"text of {s}", {"m": v}) for s, v in by_system.items()}
    pairs, dropped = run_one(candidates, systems=systems, metrics=["m"])
    assert dropped == []
    (p,) = pairs
    assert (p["chosen_system"], p["rejected_system"]) == (chosen, rejected)
    assert (p["chosen"], p["rejected"]) == (f"text of {chosen}", f"text of {rejected}")
    assert p["margin"] == by_system[chosen] - by_system[rejected]


def test_a_system_without_output_is_not_a_candidate():
    pairs, dropped = run_one(
        {REFERENCE: ("Ref.", {"m": 50.0}), "b": ("B.", {"m": 40.0})},
        systems=["a", "b"],
        metrics=["m"],
    )
    assert dropped == []
    assert (pairs[0]["chosen_system"], pairs[0]["rejected_system"]) == (REFERENCE, "b")


# ---------------------------------------------------------------------------------------------- drops


def test_chosen_text_equal_to_rejected_text_is_dropped():
    # chosen = zeta (95), rejected = alpha (20): the same text once stripped
    pairs, dropped = run_one(
        {
            "alpha": ("Hello.", {"m": 20.0}),
            "zeta": (" Hello. ", {"m": 95.0}),
            REFERENCE: ("Hi.", {"m": 80.0}),
        },
        systems=["zeta", "alpha"],
        metrics=["m"],
    )
    assert pairs == []
    assert [(d["segment_id"], d["lp"], d["reason"]) for d in dropped] == [
        ("s1", "de-en", "chosen_equals_rejected")
    ]


def test_all_scores_equal_is_dropped():
    pairs, dropped = run_one(
        {REFERENCE: ("Ref.", {"m": 50.0}), "a": ("A.", {"m": 50.0}), "b": ("B.", {"m": 50.0})},
        systems=["a", "b"],
        metrics=["m"],
    )
    assert pairs == []
    assert [d["reason"] for d in dropped] == ["chosen_equals_rejected"]


def test_margin_below_threshold_is_dropped_and_equal_margin_kept():
    def select_with_worst_score(worst: float):
        """The reference scores 60 and is chosen, "b" scores `worst` and is rejected; min_margin is 10."""
        return run_one(
            {REFERENCE: ("Ref.", {"m": 60.0}), "a": ("A.", {"m": 55.0}), "b": ("B.", {"m": worst})},
            systems=["a", "b"],
            metrics=["m"],
            min_margin=10.0,
        )

    pairs, dropped = select_with_worst_score(52.0)  # margin 60 - 52 = 8 < 10
    assert pairs == []
    assert [(d["segment_id"], d["lp"], d["reason"]) for d in dropped] == [
        ("s1", "de-en", "margin_below_threshold")
    ]

    pairs, dropped = select_with_worst_score(50.0)  # margin 60 - 50 = 10, not below 10
    assert dropped == []
    assert pairs[0]["margin"] == 10.0


def test_missing_score_is_dropped():
    # "a" has chrf but no bleu
    pairs, dropped = run_one(
        {
            REFERENCE: ("Ref.", {"chrf": 60.0, "bleu": 30.0}),
            "a": ("A.", {"chrf": 55.0}),
            "b": ("B.", {"chrf": 20.0, "bleu": 5.0}),
        },
        systems=["a", "b"],
        metrics=["chrf", "bleu"],
    )
    assert pairs == []
    assert [(d["segment_id"], d["reason"]) for d in dropped] == [("s1", "missing_score")]
    assert "a" in dropped[0]["detail"]


@pytest.mark.parametrize("only", [REFERENCE, "a"])
def test_a_single_candidate_is_too_few(only):
    pairs, dropped = run_one({only: ("Text.", {"m": 50.0})}, systems=["a", "b"], metrics=["m"])
    assert pairs == []
    assert [(d["segment_id"], d["reason"]) for d in dropped] == [("s1", "too_few_candidates")]


def test_no_candidate_at_all_is_too_few():
    pairs, dropped = select_pairs([segment("s1")], {}, {}, ["a"], ["m"])
    assert pairs == [] and [d["reason"] for d in dropped] == ["too_few_candidates"]


# --------------------------------------------------------------------------------- many segments + stats


def test_many_segments_prompts_and_stats():
    systems, metrics = ["greedy", "sample"], ["m"]
    table = {
        # sid: (lp, {system: (text, score)})
        "d1": ("de-en", {REFERENCE: ("R1", 90.0), "greedy": ("G1", 50.0), "sample": ("S1", 10.0)}),
        "d2": ("de-en", {REFERENCE: ("R2", 40.0), "greedy": ("G2", 70.0), "sample": ("S2", 40.0)}),
        "d3": ("de-en", {REFERENCE: ("R3", 90.0)}),
        "e1": ("en-de", {REFERENCE: ("R4", 30.0), "greedy": ("G4", 20.0), "sample": ("S4", 80.0)}),
        "e2": ("en-de", {REFERENCE: ("R5", 30.0), "greedy": ("R5", 20.0), "sample": ("R5", 80.0)}),
        "c1": ("cs-en", {REFERENCE: ("R6", 99.0), "greedy": ("G6", 1.0)}),
    }
    segments, texts, scores = [], {}, {}
    for sid, (lp, cands) in table.items():
        segments.append(segment(sid, lp))
        t, s = build(sid, {sys: (text, {"m": v}) for sys, (text, v) in cands.items()})
        texts.update(t)
        scores.update(s)

    pairs, dropped = select_pairs(segments, texts, scores, systems, metrics)

    # d1: ref 90 / sample 10; d2: greedy 70 / reference 40 (tie with sample 40: reference first);
    # d3: only the reference; e1: sample 80 / greedy 20; e2: all texts equal; c1: ref 99 / greedy 1.
    assert [
        (p["segment_id"], p["chosen_system"], p["rejected_system"], p["chosen"], p["rejected"], p["margin"])
        for p in pairs
    ] == [
        ("d1", REFERENCE, "sample", "R1", "S1", 80.0),
        ("d2", "greedy", REFERENCE, "G2", "R2", 30.0),
        ("e1", "sample", "greedy", "S4", "G4", 60.0),
        ("c1", REFERENCE, "greedy", "R6", "G6", 98.0),
    ]
    assert [p["prompt"] for p in pairs] == [
        PROMPT["de-en"],
        PROMPT["de-en"],
        PROMPT["en-de"],
        PROMPT["cs-en"],
    ]
    assert [(d["segment_id"], d["lp"], d["reason"]) for d in dropped] == [
        ("d3", "de-en", "too_few_candidates"),
        ("e2", "en-de", "chosen_equals_rejected"),
    ]

    assert selection_stats(pairs, dropped) == {
        "pairs": 4,
        "dropped": {"too_few_candidates": 1, "chosen_equals_rejected": 1},
        "by_lp": {
            "cs-en": {"pairs": 1, "chosen": {REFERENCE: 1}, "rejected": {"greedy": 1}},
            "de-en": {
                "pairs": 2,
                "chosen": {REFERENCE: 1, "greedy": 1},
                "rejected": {"sample": 1, REFERENCE: 1},
            },
            "en-de": {"pairs": 1, "chosen": {"sample": 1}, "rejected": {"greedy": 1}},
        },
    }


def test_selection_stats_of_hand_made_rows():
    def p(lp, chosen, rejected):
        return {"lp": lp, "chosen_system": chosen, "rejected_system": rejected}

    pairs = [
        p("de-en", REFERENCE, "greedy"),
        p("de-en", REFERENCE, "sample"),
        p("de-en", "sample", "greedy"),
        p("zh-en", "greedy", REFERENCE),
    ]
    dropped = [{"reason": "missing_score"}, {"reason": "margin_below_threshold"}, {"reason": "missing_score"}]
    stats = selection_stats(pairs, dropped)
    assert stats == {
        "pairs": 4,
        "dropped": {"missing_score": 2, "margin_below_threshold": 1},
        "by_lp": {
            "de-en": {
                "pairs": 3,
                "chosen": {REFERENCE: 2, "sample": 1},
                "rejected": {"greedy": 2, "sample": 1},
            },
            "zh-en": {"pairs": 1, "chosen": {"greedy": 1}, "rejected": {REFERENCE: 1}},
        },
    }
    assert list(stats["by_lp"]) == ["de-en", "zh-en"]


def test_selection_stats_empty():
    assert selection_stats([], []) == {"pairs": 0, "dropped": {}, "by_lp": {}}


# ------------------------------------------------------------------------------------ human labels


def test_a_human_label_decides_between_any_two_candidates():
    # the scores say reference / b; the label says b over a, and is kept whatever the margin
    candidates = {REFERENCE: ("Ref.", {"m": 90.0}), "a": ("A.", {"m": 60.0}), "b": ("B.", {"m": 10.0})}
    texts, scores = build("s1", candidates)
    pairs, dropped = select_pairs(
        [segment("s1")], texts, scores, ["a", "b"], ["m"], min_margin=5.0, preferences={"s1": ("b", "a")}
    )
    assert dropped == []
    (p,) = pairs
    assert (p["chosen_system"], p["rejected_system"], p["chosen"], p["rejected"]) == ("b", "a", "B.", "A.")
    assert (p["chosen_score"], p["rejected_score"], p["margin"]) == (10.0, 60.0, -50.0)


def test_a_label_naming_a_system_without_output_leaves_it_to_the_scores_and_the_margin():
    candidates = {REFERENCE: ("Ref.", {"m": 90.0}), "a": ("A.", {"m": 88.0})}
    texts, scores = build("s1", candidates)
    prefs = {"s1": ("b", "a")}  # "b" has no candidate here
    pairs, _ = select_pairs([segment("s1")], texts, scores, ["a", "b"], ["m"], preferences=prefs)
    assert [(p["chosen_system"], p["rejected_system"]) for p in pairs] == [(REFERENCE, "a")]
    # not decided by the label, so min_margin applies (the old Delta check skipped it for any nonzero label)
    _, dropped = select_pairs([segment("s1")], texts, scores, ["a", "b"], ["m"], 5.0, preferences=prefs)
    assert [d["reason"] for d in dropped] == ["margin_below_threshold"]


def test_the_stage_labels_win_over_delta_labels_and_stats_count_them():
    segments = [segment("s1"), segment("s2"), segment("s3", "en-de")]
    texts, scores = {}, {}
    for sid in ("s1", "s2", "s3"):
        t, s = build(sid, {REFERENCE: ("R", {"m": 9.0}), "a": ("A", {"m": 5.0}), "b": ("B", {"m": 1.0})})
        texts.update(t)
        scores.update(s)
    preferences = {"s1": ("a", "b")}
    pairs, _ = select_pairs(
        segments,
        texts,
        scores,
        ["a", "b"],
        ["m"],
        human_labels={"s1": -1.0, "s2": -1.0, "s3": 0.0},  # Delta < 0: b over a
        override_systems=("a", "b"),
        preferences=preferences,
    )
    chosen = {p["segment_id"]: (p["chosen_system"], p["rejected_system"]) for p in pairs}
    assert chosen == {"s1": ("a", "b"), "s2": ("b", "a"), "s3": (REFERENCE, "b")}
    labelled = labelled_segments(pairs, {"s1": ("a", "b"), "s2": ("b", "a")}, texts)
    assert labelled == {"s1", "s2"}
    stats = selection_stats(pairs, [], labelled)
    assert stats["from_human_labels"] == 2
    assert (
        stats["by_lp"]["de-en"]["from_human_labels"] == 2
        and stats["by_lp"]["en-de"]["from_human_labels"] == 0
    )


# ------------------------------------------------------------------------------------ scales


def test_zscore_per_direction_and_metric_by_hand():
    # de-en: chrF (0-100) alone would choose the reference of d1; z-scored, KIWI (0-1) counts as much.
    table = {
        "d1": ("de-en", {REFERENCE: ("R1", 100.0, 0.5), "a": ("A1", 60.0, 0.9)}),
        "d2": ("de-en", {REFERENCE: ("R2", 100.0, 0.6), "a": ("A2", 80.0, 0.7)}),
        "e1": ("en-de", {REFERENCE: ("R3", 10.0, 0.1), "a": ("A3", 20.0, 0.2)}),
    }
    segments, texts, scores = [], {}, {}
    for sid, (lp, cands) in table.items():
        segments.append(segment(sid, lp))
        t, s = build(sid, {sys: (text, {"chrf": c, "kiwi": k}) for sys, (text, c, k) in cands.items()})
        texts.update(t)
        scores.update(s)
    raw, _ = select_pairs(segments, texts, scores, ["a"], ["chrf", "kiwi"])
    assert [p["chosen_system"] for p in raw] == [REFERENCE, REFERENCE, "a"]
    pairs, dropped = select_pairs(segments, texts, scores, ["a"], ["chrf", "kiwi"], normalize="zscore")
    assert dropped == []
    # de-en pools: chrF [100, 60, 100, 80]: mean 85, variance (225 + 625 + 225 + 25) / 4 = 275;
    # KIWI [0.5, 0.9, 0.6, 0.7]: mean 0.675, variance (0.030625 + 0.050625 + 0.005625 + 0.000625) / 4 = 0.021875
    c, k = 275**0.5, 0.021875**0.5
    d1_ref, d1_a = ((100 - 85) / c + (0.5 - 0.675) / k) / 2, ((60 - 85) / c + (0.9 - 0.675) / k) / 2
    d2_ref, d2_a = ((100 - 85) / c + (0.6 - 0.675) / k) / 2, ((80 - 85) / c + (0.7 - 0.675) / k) / 2
    assert d1_a > d1_ref and d2_ref > d2_a  # the order the z-scores give, checked on the hand numbers
    by_sid = {p["segment_id"]: p for p in pairs}
    assert (by_sid["d1"]["chosen_system"], by_sid["d1"]["chosen_score"]) == ("a", pytest.approx(d1_a))
    assert by_sid["d1"]["rejected_score"] == pytest.approx(d1_ref)
    assert by_sid["d2"]["margin"] == pytest.approx(d2_ref - d2_a)
    # en-de is its own pool: two values per metric, z = -1 and +1, whatever de-en holds
    assert (by_sid["e1"]["chosen_score"], by_sid["e1"]["margin"]) == (pytest.approx(1.0), pytest.approx(2.0))


def test_zscore_of_a_pool_of_equal_scores_is_zero():
    texts, scores = build("s1", {REFERENCE: ("R", {"m": 7.0}), "a": ("A", {"m": 7.0})})
    assert zscores([segment("s1")], texts, scores, ["m"]) == {
        ("s1", REFERENCE, "m"): 0.0,
        ("s1", "a", "m"): 0.0,
    }


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["score.metrics=[chrf, kiwi_xxl]"], r"score\.metrics \(select\.metrics unset\)"),
        (["score.metrics=[chrf, bleu, xcomet_xxl]", "select.metrics=[chrf, xcomet_xxl]"], r"select\.metrics"),
    ],
)
def test_averaging_metrics_on_different_scales_is_a_config_error(overrides, field):
    with pytest.raises(
        ConfigError,
        match=field + r" averages metrics on different scales \(0-1: .*; 0-100: .*"
        r"select\.normalize: none",
    ):
        load_config(overrides=overrides)
    assert load_config(overrides=[*overrides, "select.normalize=zscore"]).select.normalize == "zscore"


def test_metrics_of_one_scale_need_no_normalisation():
    assert load_config(overrides=["score.metrics=[chrf, bleu, consensus_chrf]"]).select.normalize == "none"
    load_config(overrides=["score.metrics=[chrf, kiwi_xxl]", "select.metrics=[kiwi_xxl]"])
    assert load_config().select.human_preferences is True
