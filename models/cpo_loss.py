"""Preference losses as pure functions over per-sequence log-probabilities.

CPO (Xu et al., ICML 2024, eq. 3-6) drops DPO's reference model and adds a behaviour-cloning term:

    L = mean_pairs( -log sigmoid( beta * (log pi(y_w|x) - log pi(y_l|x)) ) ) + cpo_alpha * NLL(y_w)

where log pi(y|x) is the SUM of completion-token log-probs. The variants follow TRL's CPOTrainer in names and
maths: ipo and simpo use length-averaged log-probs; sft is NLL on chosen only (the paper's ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # scalar: preference term + cpo_alpha * nll
    preference: torch.Tensor  # scalar
    nll: torch.Tensor  # scalar, mean over all chosen completion tokens of the batch
    chosen_rewards: torch.Tensor  # (B,) beta * log pi(y_w|x), detached
    rejected_rewards: torch.Tensor  # (B,)


def nll_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per chosen completion token, over the whole batch (not per row).

    chosen_logps (B,) summed log-probs; chosen_tokens (B,) completion token counts. An all-empty batch gives 0.
    """
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                    rejected_tokens: torch.Tensor, beta: float = 0.1, cpo_alpha: float = 1.0,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5) -> PreferenceLoss:
    """The CPO objective and its TRL-named variants. All inputs (B,); log-probs are sums over completions."""
    nll = nll_loss(chosen_logps, chosen_tokens)
    if loss_type in ("ipo", "simpo"):
        # Length-averaged log-probs (TRL: average_log_prob=True for these two).
        chosen = chosen_logps / chosen_tokens.clamp(min=1)
        rejected = rejected_logps / rejected_tokens.clamp(min=1)
    else:
        chosen, rejected = chosen_logps, rejected_logps
    logits = chosen - rejected  # (B,)

    if loss_type == "sigmoid":
        # Conservative DPO/cDPO-style smoothing: the label is wrong with probability label_smoothing.
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, eq. 17): regress the (length-averaged) log-ratio gap to 1/(2 beta).
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        # SimPO (Meng et al. 2024): sigmoid on beta * (avg gap) - gamma; TRL's simpo_gamma is the absolute margin.
        shifted = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * shifted) * (1 - label_smoothing) - F.logsigmoid(-beta * shifted) * label_smoothing
    elif loss_type == "sft":
        losses = torch.zeros_like(logits)
    else:
        raise ValueError(f"unknown loss_type '{loss_type}' (sigmoid, hinge, ipo, simpo, sft)")

    preference = losses.mean()
    return PreferenceLoss(
        loss=preference + cpo_alpha * nll if loss_type != "sft" else nll,
        preference=preference,
        nll=nll,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )
