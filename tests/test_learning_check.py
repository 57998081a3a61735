"""The learning check (issue 9): through the real stages, CPO fixes what flawed references taught SFT.

The main variant runs over 3 seeds (about 70 s each on one CPU core), with less SFT and fewer candidates than
`alma-r learning-check` (see SIZES). The two tests at the end rerun only the preference stage of those seeds
with the method broken, and show that the same checks then fail: the check can tell a working method from a
broken one.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import replace

import pytest

import alma_r.models.train.recipe as cpo_trainer
from alma_r.data.schemas import REFERENCE
from alma_r.experiments.learning_check import (
    VARIANTS,
    Sizes,
    ablation_table,
    evaluate,
    one_torch_thread,
    preference_pairs,
    run_seed,
    train_preference,
)
from alma_r.models import synthetic
from alma_r.models.loading import load_tokenizer
from alma_r.models.score.cache import ScoreCache
from alma_r.tasks.shared.scoring import score_items

SEEDS = (0, 1, 2)
# 750 SFT steps instead of 1000 (the samples are still good enough to be chosen over the reference for about
# half the pairs; at 500 steps the reference wins 88% of them and CPO learns nothing), 4000 sources as designed.
SIZES = replace(Sizes(), sft_steps=750)


def learning_check_failures(sft: list[dict], cpo: list[dict], pairs: list[int]) -> list[str]:
    """The issue's checks on the means over the seeds (per-system metrics from evaluate_outputs)."""
    mean = lambda runs, key: statistics.fmean(r[key] for r in runs)  # noqa: E731
    failures = []
    if not mean(cpo, "adjective_kept") > 0.9:
        failures.append(f"CPO keeps {mean(cpo, 'adjective_kept'):.3f} of the adjectives (want > 0.9)")
    if not mean(sft, "adjective_kept") < 0.3:
        failures.append(f"SFT keeps {mean(sft, 'adjective_kept'):.3f} of the adjectives (want < 0.3)")
    if not mean(cpo, "exact_match_no_adjective") >= 0.95:
        failures.append(
            f"CPO's exact match without adjectives is {mean(cpo, 'exact_match_no_adjective'):.3f} (want >= 0.95)"
        )
    if not min(pairs) >= 500:
        failures.append(f"only {min(pairs)} pairs selected (want >= 500 per seed)")
    return failures


def test_the_synthetic_task_is_as_designed(tmp_path):
    assert synthetic.rule_translation("the big dog sees a cat quickly") == "THE DOG BIG A CAT SEES QUICKLY"
    assert synthetic.rule_translation("some tired owl sleeps", frozenset({"adj"})) == "SOME OWL SLEEPS"
    task = synthetic.make_task(0, n_train=2000, n_preference=10, n_test=1000)
    sources = [s.src for s in task.train + task.preference + task.test]
    assert len(set(sources)) == len(sources) and all(3 <= len(s.split()) <= 8 for s in sources)
    with_adj = [s for s in task.train if synthetic.has(s.src, "adj")]
    dropped = sum(s.ref != synthetic.rule_translation(s.src) for s in with_adj) / len(with_adj)
    assert 0.6 < dropped < 0.7  # 65% of the references with an adjective drop it
    assert all(s.ref == synthetic.rule_translation(s.src) for s in task.train if s not in with_adj)
    # The oracle: 1 - word edit distance / longer length; the flawed reference scores below 1.
    assert synthetic.oracle_score("the big dog runs", "THE DOG BIG RUNS") == 1.0
    assert synthetic.oracle_score("the big dog runs", "THE DOG RUNS") == 0.75
    # Word-level tokenizer: every prompt, source and target word is one token, nothing is unknown.
    tokenizer = synthetic.build_tokenizer()
    ids = tokenizer(task.test[0].prompt + " " + task.test[0].ref, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids).endswith(task.test[0].ref)
    # Behind the scorer interface, reference-free, scored once then cached.
    seg = next(s for s in task.test if s.ref != synthetic.rule_translation(s.src)).as_row()
    items = [
        (seg, REFERENCE, seg["ref"], []),
        (seg, "sample-0", synthetic.rule_translation(seg["src"]), []),
    ]
    scorer, cache = synthetic.OracleScorer(), ScoreCache(tmp_path / "scores.sqlite")
    rows = score_items(scorer, "oracle", items, cache, {})
    assert rows[1]["score"] == 1.0 and rows[0]["score"] == synthetic.oracle_score(seg["src"], seg["ref"])
    score_items(scorer, "oracle", items, cache, {})
    assert scorer.segments_scored == 2


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning-check")
    return [
        run_seed(VARIANTS["main"], seed, SIZES, root / f"seed{seed}", systems=("sft", "cpo"))
        for seed in SEEDS
    ]


def rerun_cpo(result, pairs, out_dir) -> dict:
    """Only the preference stage again, from the same SFT model, then the same evaluation."""
    with one_torch_thread():
        model = train_preference(result.sft_dir, pairs, "cpo", SIZES, result.seed, out_dir)
        return evaluate(model, load_tokenizer(str(result.sft_dir)), result.task.test, SIZES)


def test_cpo_goes_beyond_flawed_references_where_sft_stays(seeds):
    print("\n" + ablation_table(seeds))  # shown with -s, and in the report when the test fails
    sft = [r.metrics["sft"] for r in seeds]
    cpo = [r.metrics["cpo"] for r in seeds]
    assert learning_check_failures(sft, cpo, [len(r.pairs) for r in seeds]) == []
    # And the table's headline: CPO's exact match above the references', SFT's below.
    assert statistics.fmean(r["exact_match"] for r in cpo) > statistics.fmean(
        r.metrics["references"]["exact_match"] for r in seeds
    )


def test_the_check_fails_when_the_cpo_loss_sign_is_inverted(seeds, tmp_path, monkeypatch):
    """-log sigmoid(-beta * margin): the preference term now pushes the rejected side up. The NLL term still
    pulls the chosen side up, which is why the model learns some of the adjectives but not enough."""
    real = cpo_trainer.preference_loss

    @functools.wraps(real)
    def inverted(*args, **kwargs):
        return real(*args, **{**kwargs, "beta": -kwargs["beta"]})

    monkeypatch.setattr(cpo_trainer, "preference_loss", inverted)
    cpo = [rerun_cpo(r, r.pairs, tmp_path / f"seed{r.seed}") for r in seeds]
    failures = learning_check_failures([r.metrics["sft"] for r in seeds], cpo, [len(r.pairs) for r in seeds])
    print("\nsign inverted:", failures)
    assert any("CPO keeps" in f for f in failures), cpo


def test_the_check_fails_when_the_selection_rule_is_inverted(seeds, tmp_path):
    """chosen = worst, rejected = best: the selection rule given negated scores."""
    cpo, pairs = [], []
    for r in seeds:
        negated = {key: -value for key, value in r.scores.items()}
        inverted, _ = preference_pairs(r.task.preference, r.texts, negated, r.sample_systems)
        pairs.append(len(inverted))
        cpo.append(rerun_cpo(r, inverted, tmp_path / f"seed{r.seed}"))
    failures = learning_check_failures([r.metrics["sft"] for r in seeds], cpo, pairs)
    print("\nselection inverted:", failures)
    assert any("CPO keeps" in f for f in failures), cpo
