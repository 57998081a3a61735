"""Sequence-level CPO losses ("Sequence-level Large Language Model Training with Contrastive Preference
Optimization", anonymous ACL submission, section 4, eq. 7 and 8): the ground truth must beat K-1 synthetic
negatives, each sequence scored by its log density ratio to a frozen reference model.

    s_j = beta * log( pi_theta(y_j|x) / pi_ref(y_j|x) )          j = 0..K-1, column 0 = the ground truth

    best-of-K (eq. 7):       L = -log( exp(s_0) / sum_j exp(s_j) )
    Plackett-Luce (eq. 8):   L = -sum_k log( exp(s_tau(k)) / sum_{j>=k} exp(s_tau(j)) )

Both are pure functions of per-sequence log-probs (sums over completion tokens), shapes (B, K).

One formulation serves both, so that K=2 reproduces the DPO loss of models/train/losses.py bit for bit:
-log(exp(s_k) / sum_{j>=k} exp(s_j)) = -log sigmoid(beta * (d_k - c_k)), where d = log pi_theta - log pi_ref
(the unscaled log-ratios) and c_k = (1/beta) log sum_{j>k} exp(beta d_j) is a soft maximum of the log-ratios
ranked below k, computed as m + log(sum_{j>k} exp(beta (d_j - m))) / beta with m = max_{j>k} d_j. With a single
sequence below k that is m + log(1)/beta = d_j exactly, so the last pair's term is -log sigmoid(beta * (d_k -
d_j)), which is DPO's -log sigmoid(beta * ((pc - rc) - (pr - rr))) in the same operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SequenceCPOLoss:
    loss: torch.Tensor  # scalar: the mean over the B examples
    losses: torch.Tensor  # (B,) per example
    rewards: torch.Tensor  # (B, K) detached beta * log-ratio, column 0 = ground truth
    ground_truth_reward: torch.Tensor  # scalar, mean over B of rewards[:, 0]
    negative_reward: torch.Tensor  # scalar, mean over B and the K-1 negatives
    accuracy: (
        torch.Tensor
    )  # scalar, share of examples whose ground truth has a strictly higher reward than all

    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss.item(),
            "rewards/ground_truth": self.ground_truth_reward.item(),
            "rewards/negatives": self.negative_reward.item(),
            "rewards/margins": (self.ground_truth_reward - self.negative_reward).item(),
            "rewards/accuracies": self.accuracy.item(),
        }


def _check(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> None:
    if policy_logps.ndim != 2 or policy_logps.shape != ref_logps.shape or policy_logps.shape[1] < 2:
        raise ValueError(
            f"policy and reference log-probs must both be (B, K) with K >= 2, got {tuple(policy_logps.shape)} "
            f"and {tuple(ref_logps.shape)}"
        )


def _ranked_terms(log_ratios: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, K) log-ratios in rank order (best first) -> (B, K-1): -log(exp(s_k) / sum_{j>=k} exp(s_j)) for
    k = 0..K-2. The k = K-1 term is log(1) = 0 and is left out."""
    B, K = log_ratios.shape
    below = torch.ones(K - 1, K, dtype=torch.bool, device=log_ratios.device).triu(1)  # (K-1, K): j > k
    rows = log_ratios.unsqueeze(1).expand(B, K - 1, K)  # (B, K-1, K)
    m = rows.masked_fill(~below, float("-inf")).amax(-1, keepdim=True)  # (B, K-1, 1): finite, j > k exists
    scaled = (beta * (rows - m)).masked_fill(~below, float("-inf"))  # exp(-inf) = 0 for j <= k
    soft_max_below = m.squeeze(-1) + scaled.exp().sum(-1).log() / beta  # (B, K-1)
    return -F.logsigmoid(beta * (log_ratios[:, : K - 1] - soft_max_below))


def _result(losses: torch.Tensor, log_ratios: torch.Tensor, beta: float) -> SequenceCPOLoss:
    rewards = (beta * log_ratios).detach()  # (B, K)
    B = losses.shape[0]
    return SequenceCPOLoss(
        # sum / B rather than mean(): the same operations as preference_loss, so K=2 matches DPO exactly
        loss=losses.sum() / max(B, 1),
        losses=losses,
        rewards=rewards,
        ground_truth_reward=rewards[:, 0].mean(),
        negative_reward=rewards[:, 1:].mean(),
        accuracy=(rewards[:, 0] > rewards[:, 1:].amax(-1)).float().mean(),
    )


def best_of_k_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float = 5.0) -> SequenceCPOLoss:
    """Eq. 7: -log softmax_j(beta * log(pi_theta(y_j|x) / pi_ref(y_j|x)))[0], averaged over B.

    policy_logps, ref_logps: (B, K) sums of completion-token log-probs; column 0 is the ground truth, columns
    1..K-1 the negatives (their order does not matter). beta defaults to the paper's 5."""
    _check(policy_logps, ref_logps)
    log_ratios = policy_logps - ref_logps  # (B, K)
    # Best-of-K is the first factor of the Plackett-Luce product: ground truth first, the rest in any order.
    losses = _ranked_terms(log_ratios, beta)[:, 0]  # (B,)
    return _result(losses, log_ratios, beta)


def plackett_luce_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranking: torch.Tensor, beta: float = 5.0
) -> SequenceCPOLoss:
    """Eq. 8: -sum_{k=1}^{K-1} log( exp(s_tau(k)) / sum_{j>=k} exp(s_tau(j)) ), averaged over B.

    ranking (B, K): column indices of policy_logps, best first (models/sequence/embedding_rank.py gives ground truth
    first, then the negatives by decreasing similarity). The k = K term of eq. 8 is log(1) = 0 and is left
    out of the sum. Rewards and accuracy in the result keep the column order of the inputs (0 = ground truth).
    """
    _check(policy_logps, ref_logps)
    ranking = torch.as_tensor(ranking, dtype=torch.long, device=policy_logps.device)
    B, K = policy_logps.shape
    if ranking.shape != (B, K):
        raise ValueError(f"ranking must be (B, K) = {(B, K)}, got {tuple(ranking.shape)}")
    expected = torch.arange(K, device=ranking.device).expand(B, K)
    bad = (ranking.sort(-1).values != expected).any(-1).nonzero()
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"ranking row {row} is not a permutation of 0..{K - 1}: {ranking[row].tolist()}")
    log_ratios = policy_logps - ref_logps  # (B, K)
    losses = _ranked_terms(log_ratios.gather(1, ranking), beta).sum(-1)  # (B,)
    return _result(losses, log_ratios, beta)
