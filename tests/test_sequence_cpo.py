"""Sequence-level CPO losses (eq. 7 and 8) against hand-computed values, and K=2 against the DPO loss."""

from __future__ import annotations

import math

import pytest
import torch

from alma_r.models.sequence.losses import best_of_k_loss, plackett_luce_loss
from alma_r.models.train.losses import preference_loss

# Two examples, K = 3 (column 0 = ground truth). Log-ratios d = policy - ref:
#   example 0: (-2+3, -4+3, -3+3) = (1, -1, 0)        example 1: (-6+5, -2+4, -7+7) = (-1, 2, 0)
POLICY = torch.tensor([[-2.0, -4.0, -3.0], [-6.0, -2.0, -7.0]], dtype=torch.float64)
REF = torch.tensor([[-3.0, -3.0, -3.0], [-5.0, -4.0, -7.0]], dtype=torch.float64)
D = [(1.0, -1.0, 0.0), (-1.0, 2.0, 0.0)]


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


@pytest.mark.parametrize("beta", [1.0, 5.0, 0.3])
def test_best_of_k_matches_hand_computation(beta):
    want = []
    for d in D:
        s = [beta * x for x in d]
        want.append(-(s[0] - _lse(*s)))  # -log( e^s0 / (e^s0 + e^s1 + e^s2) )
    out = best_of_k_loss(POLICY, REF, beta=beta)
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(want) / 2, rel=1e-12)
    assert out.rewards.flatten().tolist() == pytest.approx([beta * x for d in D for x in d])
    assert out.ground_truth_reward.item() == pytest.approx(beta * (1 - 1) / 2)
    assert out.negative_reward.item() == pytest.approx(beta * (-1 + 0 + 2 + 0) / 4)
    assert out.accuracy.item() == 0.5  # example 0's ground truth is on top, example 1's is not


def test_best_of_k_numbers_written_out():
    # beta = 1, example 0: s = (1, -1, 0): loss = log(e + e^-1 + 1) - 1 = 0.40760596...
    out = best_of_k_loss(POLICY[:1], REF[:1], beta=1.0)
    assert out.loss.item() == pytest.approx(math.log(math.e + math.exp(-1) + 1) - 1, rel=1e-12)
    assert out.loss.item() == pytest.approx(0.4076059644, abs=1e-9)


@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_plackett_luce_matches_hand_computation(beta):
    ranking = torch.tensor([[0, 2, 1], [1, 0, 2]])
    want = []
    for d, order in zip(D, ranking.tolist(), strict=True):
        s = [beta * d[j] for j in order]
        # k = 1 and k = 2 of eq. 8; the k = 3 term is log(e^s3 / e^s3) = 0
        want.append(-(s[0] - _lse(s[0], s[1], s[2])) - (s[1] - _lse(s[1], s[2])))
    out = plackett_luce_loss(POLICY, REF, ranking, beta=beta)
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(want) / 2, rel=1e-12)
    # rewards stay in input column order whatever the ranking
    assert out.rewards.flatten().tolist() == pytest.approx([beta * x for d in D for x in d])


def test_plackett_luce_with_ground_truth_first_adds_the_ranking_of_the_negatives():
    # Same first factor as best-of-K; the second factor ranks the negatives.
    ranking = torch.tensor([[0, 2, 1], [0, 1, 2]])
    pl = plackett_luce_loss(POLICY, REF, ranking, beta=1.0)
    bok = best_of_k_loss(POLICY, REF, beta=1.0)
    second = [-(0.0 - _lse(0.0, -1.0)), -(2.0 - _lse(2.0, 0.0))]
    assert (pl.losses - bok.losses).tolist() == pytest.approx(second, rel=1e-12)


def _dpo(chosen, rejected, ref_chosen, ref_rejected, beta):
    ones = torch.ones(len(chosen), dtype=torch.long)
    return preference_loss(
        chosen,
        rejected,
        ones,
        ones,
        beta=beta,
        cpo_alpha=0.0,
        loss_type="dpo",
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.1, 5.0, 1.7])
def test_k2_with_ranking_is_exactly_dpo(beta, dtype):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=dtype) * 20 - 40 for _ in range(4))
    dpo = _dpo(pc, pr, rc, rr, beta)
    policy, ref = torch.stack([pc, pr], 1), torch.stack([rc, rr], 1)  # (64, 2)
    ranked = plackett_luce_loss(policy, ref, torch.tensor([[0, 1]]).expand(64, 2), beta=beta)
    assert torch.equal(ranked.loss, dpo.preference) and torch.equal(ranked.loss, dpo.loss)
    assert torch.equal(best_of_k_loss(policy, ref, beta=beta).loss, dpo.loss)
    # a ranking that puts the negative first is DPO with the pair swapped, also exactly
    swapped = plackett_luce_loss(policy, ref, torch.tensor([[1, 0]]).expand(64, 2), beta).loss
    assert torch.equal(swapped, _dpo(pr, pc, rr, rc, beta).loss)


def test_gradients_are_finite_and_point_the_right_way():
    # Large log-ratio gaps (beta 5 x 100 nats) must not overflow.
    policy = torch.tensor([[-10.0, -200.0, -5.0, -5.0], [-300.0, -1.0, -50.0, -60.0]], requires_grad=True)
    ref = torch.tensor([[-100.0, -10.0, -5.0, -6.0], [-10.0, -300.0, -50.0, -50.0]])
    for out in (
        best_of_k_loss(policy, ref, beta=5.0),
        plackett_luce_loss(policy, ref, torch.tensor([[0, 3, 2, 1], [0, 2, 3, 1]]), beta=5.0),
    ):
        (grad,) = torch.autograd.grad(out.loss, policy)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
        assert (grad[:, 0] <= 0).all()  # raising the ground truth's log-prob never raises the loss
    # a row whose ground truth is already far ahead contributes (almost) nothing
    out = best_of_k_loss(policy, ref, beta=5.0)
    assert out.losses[0].item() < 1e-30 and out.losses[1].item() > 100


def test_bad_shapes_and_rankings_are_rejected():
    with pytest.raises(ValueError, match="K >= 2"):
        best_of_k_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="both be"):
        best_of_k_loss(torch.zeros(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ranking row 1 is not a permutation"):
        plackett_luce_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[0, 1, 2], [0, 0, 2]]))
