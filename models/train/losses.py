"""Preference losses as pure functions over per-sequence log-probabilities.

CPO (Xu et al., ICML 2024, eq. 3-6) drops DPO's reference model and adds a behaviour-cloning term:

    L = mean_pairs( -log sigmoid( beta * (log pi(y_w|x) - log pi(y_l|x)) ) ) + cpo_alpha * NLL(y_w)

where log pi(y|x) is the SUM of completion-token log-probs and NLL the mean over chosen completion tokens.
The variants follow TRL's CPOTrainer/DPOTrainer in names and maths: ipo and simpo use length-averaged log-probs;
dpo needs reference log-probs; sft is NLL on chosen only (the paper's "SFT on preferred" ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alma_r.models.train.settings import LOSS_TYPES


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # scalar: preference term + cpo_alpha * nll
    preference: torch.Tensor  # scalar, sum of per-pair losses / pair_normalizer
    nll: torch.Tensor  # scalar, -sum of chosen log-probs / token_normalizer
    chosen_rewards: torch.Tensor  # (B,) detached; beta * log pi(y_w|x) (dpo: beta * log-ratio to reference)
    rejected_rewards: torch.Tensor  # (B,)


def nll_loss(
    chosen_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    token_normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood per chosen completion token: -sum(log-probs) / number of tokens.

    chosen_logps (B,) summed log-probs; chosen_tokens (B,) token counts. The normalizer defaults to this batch's
    token count; the trainer passes the count of the whole optimizer step (all accumulation micro-batches and
    processes) so that accumulation and data parallelism do not change the objective. No tokens gives 0.
    """
    if token_normalizer is None:
        token_normalizer = chosen_tokens.sum()
    return -chosen_logps.sum() / torch.as_tensor(token_normalizer, dtype=chosen_logps.dtype).clamp(min=1)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
    cpo_alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    pair_normalizer: float | None = None,
    token_normalizer: float | torch.Tensor | None = None,
) -> PreferenceLoss:
    """The CPO objective and its TRL-named variants. All tensor inputs (B,); log-probs are sums over completions.

    `simpo_gamma` is TRL's absolute margin (the SimPO paper's gamma/beta ratio r gives simpo_gamma = r * beta).
    `pair_normalizer` defaults to B (a mean over the pairs of this batch).
    """
    nll = nll_loss(chosen_logps, chosen_tokens, token_normalizer)
    if loss_type in ("ipo", "simpo"):
        # Length-averaged log-probs (TRL: average_log_prob=True for these two).
        chosen = chosen_logps / chosen_tokens.clamp(min=1)
        rejected = rejected_logps / rejected_tokens.clamp(min=1)
    elif loss_type == "dpo":
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(
                "loss_type 'dpo' needs reference log-probs (ref_chosen_logps, ref_rejected_logps)"
            )
        chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    else:
        chosen, rejected = chosen_logps, rejected_logps
    logits = chosen - rejected  # (B,)

    if loss_type in ("sigmoid", "dpo"):
        # Conservative (cDPO) smoothing: the label is wrong with probability label_smoothing.
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        # IPO (Azar et al. 2023, eq. 17): regress the (length-averaged) log-ratio gap to 1/(2 beta).
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * avg_gap - gamma).
        shifted = logits - simpo_gamma / beta
        losses = (
            -F.logsigmoid(beta * shifted) * (1 - label_smoothing)
            - F.logsigmoid(-beta * shifted) * label_smoothing
        )
    elif loss_type == "sft":
        losses = torch.zeros_like(logits)
    else:
        raise ValueError(f"unknown loss_type '{loss_type}' (one of {', '.join(LOSS_TYPES)})")

    preference = losses.sum() / (pair_normalizer if pair_normalizer is not None else max(len(losses), 1))
    return PreferenceLoss(
        loss=nll if loss_type == "sft" else preference + cpo_alpha * nll,
        preference=preference,
        nll=nll,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )
