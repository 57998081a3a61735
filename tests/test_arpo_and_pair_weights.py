"""ARPO (X-ALMA's adaptive rejection) and weighted pairs (select.pairs beyond ALMA-R's one pair per source):
hand-computed values, the identity setting that is CPO exactly, float64 gradcheck, and the trainer's weighting."""

from __future__ import annotations

import math

import pytest
import torch

from alma_r.config import ConfigError, load_config
from alma_r.models.train.losses import arpo_rejection_weight, preference_loss
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.settings import TrainSettings
from alma_r.tasks.shared.selection import select_pairs

CHOSEN, CHOSEN_TOKENS = torch.tensor([-2.0, -2.0]), torch.tensor([2, 2])
REJECTED, REJECTED_TOKENS = torch.tensor([-4.0, -40.0]), torch.tensor([2, 4])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_arpo_matches_hand_derivation():
    # Length-averaged gaps: |-1 - -2| = 1 and |-1 - -10| = 9. tau = min(0.9 e^(0.4 gap) - 1, 1):
    # 0.9 e^0.4 - 1 = 0.342642... for the close pair; 0.9 e^3.6 - 1 = 32.9 -> clamped to 1 for the far one.
    tau_close = 0.9 * math.exp(0.4) - 1
    out = preference_loss(CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, beta=0.1, loss_type="arpo")
    logits = (-2 + tau_close * 4, -2 + 1.0 * 40)
    preference = (softplus(-0.1 * logits[0]) + softplus(-0.1 * logits[1])) / 2
    assert out.preference.item() == pytest.approx(preference, abs=1e-6)
    assert out.nll.item() == pytest.approx(4 / 4, abs=1e-6)
    tau = arpo_rejection_weight(CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, 0.9, 0.4)
    assert tau.tolist() == pytest.approx([tau_close, 1.0], abs=1e-6)


def test_arpo_at_the_identity_setting_is_cpo_exactly():
    # arpo_scale 2, arpo_rate 0: tau = min(2 * 1 - 1, 1) = 1 for every pair.
    cpo = preference_loss(CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, beta=0.3, loss_type="sigmoid")
    arpo = preference_loss(
        CHOSEN,
        REJECTED,
        CHOSEN_TOKENS,
        REJECTED_TOKENS,
        beta=0.3,
        loss_type="arpo",
        arpo_scale=2.0,
        arpo_rate=0.0,
    )
    for field in ("loss", "preference", "nll", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(cpo, field), getattr(arpo, field)), field


def test_arpo_gradients_pass_gradcheck_in_float64(monkeypatch):
    # tau is detached: the gradient is that of the loss with each pair's tau held at its value. gradcheck the
    # loss with tau frozen at the values the point gives (numerical differences then see the same function),
    # and the whole function where tau is clamped to 1 (locally constant, so detaching changes nothing).
    from alma_r.models.train import losses

    chosen = torch.tensor([-2.0, -5.0, -3.5], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-4.0, -3.0, -3.6], dtype=torch.float64, requires_grad=True)
    tokens_c, tokens_r = torch.tensor([2, 4, 3]), torch.tensor([3, 3, 3])
    tau = arpo_rejection_weight(chosen, rejected, tokens_c, tokens_r, 0.9, 0.4).detach()
    assert tau.max() < 1  # the adaptive region, not the clamp (negative below a gap of ln(1/0.9)/0.4)

    def loss(c, r):
        return preference_loss(c, r, tokens_c, tokens_r, beta=0.2, loss_type="arpo").loss

    with monkeypatch.context() as m:
        m.setattr(losses, "arpo_rejection_weight", lambda *args: tau)
        assert torch.autograd.gradcheck(loss, (chosen, rejected))
    far = torch.tensor([-30.0, -40.0, -36.0], dtype=torch.float64, requires_grad=True)  # gaps >= 8: tau = 1
    assert torch.autograd.gradcheck(loss, (chosen, far))


def test_the_rejection_weight_is_detached():
    # The gradient is that of CPO's margin with tau held constant: d/d logp_l of -log sigmoid(beta(w - tau l))
    # = beta * tau * sigmoid(-beta * (w - tau l)), nothing from tau's own dependence on the log-probs.
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    preference_loss(
        chosen, rejected, torch.tensor([2]), torch.tensor([2]), beta=0.1, loss_type="arpo"
    ).preference.backward()
    tau = 0.9 * math.exp(0.4) - 1
    logit = -2 + tau * 4
    sig = 1 / (1 + math.exp(0.1 * logit))
    assert rejected.grad.item() == pytest.approx(0.1 * tau * sig, abs=1e-6)


def test_pair_weights_weigh_the_preference_and_the_nll():
    w = torch.tensor([0.5, 1.0])
    out = preference_loss(CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, beta=0.1, pair_weights=w)
    # sigmoid logits 2 and 38; normalizers default to the weight sums: 1.5 pairs, 0.5 * 2 + 1 * 2 = 3 tokens.
    assert out.preference.item() == pytest.approx((0.5 * softplus(-0.2) + softplus(-3.8)) / 1.5, abs=1e-6)
    assert out.nll.item() == pytest.approx((0.5 * 2 + 2) / 3, abs=1e-6)
    unweighted = preference_loss(CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, beta=0.1)
    ones = preference_loss(
        CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, beta=0.1, pair_weights=torch.ones(2)
    )
    assert ones.loss.item() == pytest.approx(unweighted.loss.item(), abs=1e-7)


def _pair(i: int, rejected: str, weight: float = 1.0) -> dict:
    return {
        "prompt": f"Translate this from German to English:\nGerman: Satz {i}\nEnglish:",
        "chosen": f"Sentence number {i}",
        "rejected": rejected,
        "weight": weight,
    }


def _recipe(model_dir, pairs, out_dir) -> CPORecipe:
    settings = TrainSettings(max_steps=1, batch_size=len(pairs), max_prompt_length=64, max_length=128)
    return CPORecipe(settings, str(model_dir), pairs, out_dir, seed=3).setup()


def test_a_source_with_two_half_weight_pairs_counts_as_one_pair(tiny_model_dir, tmp_path):
    # Source 1's one pair, duplicated as two pairs of weight 1/2, gives the loss of the unweighted pairs.
    single = _recipe(tiny_model_dir, [_pair(0, "Wrong 0"), _pair(1, "Wrong 1")], tmp_path / "a")
    halves = _recipe(
        tiny_model_dir,
        [_pair(0, "Wrong 0"), _pair(1, "Wrong 1", 0.5), _pair(1, "Wrong 1", 0.5)],
        tmp_path / "b",
    )
    assert halves.pair_weights.tolist() == [1.0, 0.5, 0.5]
    with torch.no_grad():
        one = single._loss([0, 1], *single._step_normalizers([0, 1]))[0]
        two = halves._loss([0, 1, 2], *halves._step_normalizers([0, 1, 2]))[0]
    assert two.preference.item() == pytest.approx(one.preference.item(), rel=1e-5)
    assert two.nll.item() == pytest.approx(one.nll.item(), rel=1e-5)
    assert single.pair_weights is None  # every weight 1: the unweighted maths, bit for bit


# ------------------------------------------------------------------------------------------------ selection


def _segment(sid: str) -> dict:
    return {"id": sid, "lp": "de-en", "src_lang": "de", "tgt_lang": "en", "src": "Hallo.", "ref": None}


SCORED = {"reference": ("Hello.", 80.0), "a": ("Hi.", 60.0), "b": ("Hey.", 70.0), "c": ("Hullo.", 20.0)}


def _select(mode: str, min_margin: float = 0.0, top_k: int = 2):
    texts = {("s1", s): t for s, (t, _) in SCORED.items()}
    scores = {("s1", s, "chrf"): v for s, (_, v) in SCORED.items()}
    return select_pairs(
        [_segment("s1")], texts, scores, ["a", "b", "c"], ["chrf"], min_margin, pairs_mode=mode, top_k=top_k
    )


def test_best_vs_all_pairs_the_best_with_every_worse_candidate_by_margin():
    pairs, dropped = _select("best_vs_all", min_margin=15)
    # reference 80 vs b 70 (margin 10 < 15: out), a 60 (20), c 20 (60).
    assert [(p["chosen_system"], p["rejected_system"], p["margin"]) for p in pairs] == [
        ("reference", "a", 20.0),
        ("reference", "c", 60.0),
    ]
    assert [p["weight"] for p in pairs] == [0.5, 0.5] and not dropped


def test_top_k_bottom_k_pairs_each_of_the_best_with_each_of_the_worst():
    pairs, _ = _select("top_k_bottom_k", top_k=2)
    assert sorted((p["chosen_system"], p["rejected_system"]) for p in pairs) == [
        ("b", "a"),
        ("b", "c"),
        ("reference", "a"),
        ("reference", "c"),
    ]
    assert sum(p["weight"] for p in pairs) == pytest.approx(1.0)


def test_best_worst_is_alma_r_one_pair_of_weight_one():
    pairs, _ = _select("best_worst")
    assert [(p["chosen_system"], p["rejected_system"], p["weight"]) for p in pairs] == [
        ("reference", "c", 1.0)
    ]


def test_no_candidate_worse_by_the_margin_is_dropped_with_its_reason():
    pairs, dropped = _select("best_vs_all", min_margin=100)
    assert not pairs and dropped[0]["reason"] == "margin_below_threshold"


def test_several_pairs_with_a_noised_rejected_side_is_a_config_error():
    with pytest.raises(ConfigError, match="select.pairs"):
        load_config(None, ["select.pairs=best_vs_all", "select.rejected=noise"])


def test_arpo_settings_enter_the_checkpoint_identity_only_for_arpo():
    # A checkpoint written before ARPO existed (no arpo_* fields) must still resume a sigmoid run.
    sigmoid = TrainSettings().identity(seed=1)
    assert "arpo_scale" not in sigmoid and TrainSettings(arpo_scale=2.0).identity(seed=1) == sigmoid
    arpo = TrainSettings(loss_type="arpo")
    assert arpo.identity(seed=1)["arpo_scale"] == 0.9
    assert TrainSettings(loss_type="arpo", arpo_rate=0.0).identity(seed=1) != arpo.identity(seed=1)
