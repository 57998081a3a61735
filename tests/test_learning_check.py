"""The learning check (issue 9): through the real stages, CPO fixes what flawed references taught SFT.

The main variant runs over 3 seeds (about 90 s each on one CPU core) with the sizes of `alma-r learning-check`
but only its SFT and CPO rows, and every seed must pass on its own. The two tests at the end rerun only the
preference stage of those seeds with the method broken, and show that the same checks then fail on every
seed: the check can tell a working method from a broken one.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

import alma_r.models.train.recipe as cpo_trainer
from alma_r.data.schemas import REFERENCE
from alma_r.experiments.learning_check import (
    VARIANTS,
    Sizes,
    evaluate,
    one_torch_thread,
    preference_pairs,
    run_seed,
    train_preference,
)
from alma_r.experiments.learning_check_tables import ablation_table, per_seed_table
from alma_r.models import synthetic
from alma_r.models.loading import load_tokenizer
from alma_r.models.score.cache import ScoreCache
from alma_r.models.train.losses import nll_loss
from alma_r.tasks.shared.scoring import score_items

SEEDS = (0, 1, 2)
# The command's sizes. Measured over seeds 0-2 with ATen's AVX2 kernels and with its scalar `default` ones
# (different rounding), every seed is far from every threshold below: SFT keeps at most 0.10 of the
# adjectives, CPO all of them, CPO's exact match without an adjective is at least 0.985, each seed selects at
# least 1947 pairs. (SFT at lr 2e-3, next to divergence: CPO kept 0.42-1.0 of them; see Sizes.)
SIZES = Sizes()


def learning_check_failures(sft: dict, cpo: dict, pairs: int) -> list[str]:
    """The issue's checks on one seed (per-system metrics from evaluate_outputs)."""
    failures = []
    if not cpo["adjective_kept"] > 0.9:
        failures.append(f"CPO keeps {cpo['adjective_kept']:.3f} of the adjectives (want > 0.9)")
    if not sft["adjective_kept"] < 0.3:
        failures.append(f"SFT keeps {sft['adjective_kept']:.3f} of the adjectives (want < 0.3)")
    if not cpo["exact_match_no_adjective"] >= 0.95:
        failures.append(
            f"CPO's exact match without adjectives is {cpo['exact_match_no_adjective']:.3f} (want >= 0.95)"
        )
    if not pairs >= 500:
        failures.append(f"only {pairs} pairs selected (want >= 500)")
    return failures


def failures_per_seed(seeds, cpo: list[dict], pairs: list[int]) -> dict[int, list[str]]:
    return {
        r.seed: learning_check_failures(r.metrics["sft"], m, n)
        for r, m, n in zip(seeds, cpo, pairs, strict=True)
    }


def test_the_synthetic_task_is_as_designed(tmp_path):
    assert synthetic.rule_translation("the big dog sees a cat quickly") == "THE DOG BIG A CAT SEES QUICKLY"
    assert synthetic.rule_translation("some tired owl sleeps", frozenset({"adj"})) == "SOME OWL SLEEPS"
    # The imperfect variant's flaw: a perfect translation loses its adverb, else its adjective, else the
    # subject's determiner; a flawed one stays as it is.
    assert synthetic.blemish("the big dog sees a cat quickly", "THE DOG BIG A CAT SEES QUICKLY") == (
        "THE DOG BIG A CAT SEES"
    )
    assert synthetic.blemish("some tired owl sleeps", "SOME OWL TIRED SLEEPS") == "SOME OWL SLEEPS"
    assert synthetic.blemish("the dog runs", "THE DOG RUNS") == "DOG RUNS"
    assert synthetic.blemish("the dog runs", "THE DOG") == "THE DOG"
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
        run_seed(VARIANTS["main"], seed, SIZES, root / f"seed{seed}", systems=("sft", "cpo", "arpo"))
        for seed in SEEDS
    ]


def rerun_cpo(result, pairs, out_dir) -> dict:
    """Only the preference stage again, from the same SFT model, then the same evaluation."""
    with one_torch_thread():
        model = train_preference(result.sft_dir, pairs, "cpo", SIZES, result.seed, out_dir)
        return evaluate(model, load_tokenizer(str(result.sft_dir)), result.task.test, SIZES)


def test_cpo_goes_beyond_flawed_references_where_sft_stays(seeds):
    print("\n" + ablation_table(seeds) + "\n\n" + per_seed_table(seeds))  # with -s, and when the test fails
    failures = failures_per_seed(seeds, [r.metrics["cpo"] for r in seeds], [len(r.pairs) for r in seeds])
    assert failures == {r.seed: [] for r in seeds}
    # And the table's headline, on every seed: CPO's exact match above the references', SFT's below.
    for r in seeds:
        exact = {system: r.metrics[system]["exact_match"] for system in ("sft", "references", "cpo")}
        assert exact["sft"] < exact["references"] < exact["cpo"], (r.seed, exact)


def test_the_check_fails_when_the_nll_term_imitates_the_rejected_side(seeds, tmp_path, monkeypatch):
    """CPO's NLL term on the rejected side instead of the chosen one (e.g. the two halves of the batch's
    log-probs read the wrong way round for it): the model imitates the worst candidate, which drops or
    garbles the adjective. Measured: CPO keeps 0.14-0.19 of the adjectives.

    Not the preference term's sign (the test this one replaces): on this task the NLL term on the chosen
    side alone teaches every adjective (SFT on chosen: 1.000), and the inverted term (its gradient on a pair's
    log-probability is at most beta = 0.1) only slows it down: measured, CPO with the sign inverted keeps
    0.84-0.96 of the adjectives, on either side of the 0.9 threshold. The sign is pinned by
    tests/test_cpo_loss.py (the hand derivation of eq. 3-6)."""
    real = cpo_trainer.preference_loss

    @functools.wraps(real)
    def nll_on_rejected(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, **kwargs):
        out = real(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, **kwargs)
        nll = nll_loss(rejected_logps, rejected_tokens, kwargs.get("token_normalizer"))
        return replace(out, loss=out.preference + kwargs["cpo_alpha"] * nll, nll=nll)

    monkeypatch.setattr(cpo_trainer, "preference_loss", nll_on_rejected)
    cpo = [rerun_cpo(r, r.pairs, tmp_path / f"seed{r.seed}") for r in seeds]
    failures = failures_per_seed(seeds, cpo, [len(r.pairs) for r in seeds])
    print("\nNLL on the rejected side:", failures)
    assert all(any("CPO keeps" in f for f in found) for found in failures.values()), cpo


def test_the_check_fails_when_the_selection_rule_is_inverted(seeds, tmp_path):
    """chosen = worst, rejected = best: the selection rule given negated scores. Measured: CPO keeps at most
    0.03 of the adjectives."""
    cpo, pairs = [], []
    for r in seeds:
        negated = {key: -value for key, value in r.scores.items()}
        inverted, _ = preference_pairs(r.task.preference, r.texts, negated, r.sample_systems)
        pairs.append(len(inverted))
        cpo.append(rerun_cpo(r, inverted, tmp_path / f"seed{r.seed}"))
    failures = failures_per_seed(seeds, cpo, pairs)
    print("\nselection inverted:", failures)
    assert all(any("CPO keeps" in f for f in found) for found in failures.values()), cpo


# ARPO (X-ALMA's adaptive rejection, the repository's coefficients): the preference term must do work of its own
# on every seed. Measured (docs/learning-check.md's main table, 10 seeds): ARPO raises the mean log-prob margin of
# its pairs by 5.56 ± 0.63, at least 4.67 on seeds 0-2; the same runs with the preference term's sign inverted by
# 2.08-2.44 (seeds 0-2). The NLL term alone teaches the adjectives here, so exact match cannot tell them apart.
ARPO_MIN_MARGIN_GAIN = 3.5


def test_arpo_widens_the_margin_of_its_pairs_on_every_seed(seeds):
    gains = {r.seed: r.metrics["arpo"]["pair_margin_gain"] for r in seeds}
    assert all(g >= ARPO_MIN_MARGIN_GAIN for g in gains.values()), gains
    assert all(r.metrics["arpo"]["adjective_kept"] > 0.9 for r in seeds)


def test_the_arpo_check_fails_with_the_preference_sign_inverted(seeds, tmp_path, monkeypatch):
    """-log sigmoid(-beta (logp_w - tau logp_l)) instead of -log sigmoid(+...): the margin gain falls below the
    bar on every seed (measured 2.08-2.44 on seeds 0-2)."""
    import torch.nn.functional as F

    from alma_r.models.train import losses

    real = cpo_trainer.preference_loss

    @functools.wraps(real)
    def inverted(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, **kwargs):
        out = real(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, **kwargs)
        tau = losses.arpo_rejection_weight(
            chosen_logps,
            rejected_logps,
            chosen_tokens,
            rejected_tokens,
            kwargs["arpo_scale"],
            kwargs["arpo_rate"],
        )
        margin = chosen_logps - tau * rejected_logps
        preference = -F.logsigmoid(-kwargs["beta"] * margin).sum() / kwargs["pair_normalizer"]
        return replace(out, loss=preference + kwargs["cpo_alpha"] * out.nll, preference=preference)

    monkeypatch.setattr(cpo_trainer, "preference_loss", inverted)
    gains = {}
    with one_torch_thread():
        for r in seeds:
            model = train_preference(r.sft_dir, r.pairs, "arpo", SIZES, r.seed, tmp_path / f"seed{r.seed}")
            gains[r.seed] = model.pair_margin_gain
    print("\nARPO with the sign inverted, margin gains:", gains)
    assert all(g < ARPO_MIN_MARGIN_GAIN for g in gains.values()), gains
