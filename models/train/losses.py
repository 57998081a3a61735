"""Preference losses as pure functions over per-sequence log-probabilities.

CPO (Xu et al., ICML 2024, eq. 3-6) drops DPO's reference model and adds a behaviour-cloning term:

    L = mean_pairs( -log sigmoid( beta * (log pi(y_w|x) - log pi(y_l|x)) ) ) + cpo_alpha * NLL(y_w)

where log pi(y|x) is the SUM of completion-token log-probs and NLL the mean over chosen completion tokens.
The variants follow TRL's CPOTrainer/DPOTrainer in names and maths: ipo and simpo use length-averaged log-probs;
dpo needs reference log-probs; sft is NLL on chosen only (the paper's "SFT on preferred" ablation).

ARPO (adaptive-rejection preference optimisation; Xu et al., "X-ALMA", ICLR 2025, Section 5) scales the rejected
side of CPO's margin by a weight that grows with how far apart the pair is, so that near-identical pairs (most
translation pairs: a word apart) are not pushed apart as hard as CPO pushes them ("over-rejection"):

    L = mean_pairs( -log sigmoid( beta * (log pi(y_w|x) - tau * log pi(y_l|x)) ) ) + cpo_alpha * NLL(y_w)
    tau = min( arpo_scale * exp(arpo_rate * |avg log pi(y_w|x) - avg log pi(y_l|x)|) - 1, 1 )

with avg the length-averaged log-probs. This is the form and naming of the authors' code (fe1ixxu/ALMA,
utils/cpo_trainer.py, `relax_cofficient_1/2`, defaults 0.9 and 0.4); the paper's own text was not reachable from
this workspace, and its coefficient (reported as eta = 1.5 in the repository's issue #82) is not confirmed here.
tau = 1 (arpo_scale 2, arpo_rate 0) is CPO exactly. With arpo_scale < 1, tau is negative below a gap of
ln(1/arpo_scale)/arpo_rate (0.26 nats per token at 0.9 and 0.4): the rejected side of a near-identical pair is
then pulled up a little, towards its chosen twin, as in the authors' code. Unlike the authors' code, tau is
DETACHED: it is a per-pair weight on the rejection, read off the current policy; with gradients through it the
loss could be lowered by moving the pair's length-averaged log-probs apart (a larger tau lowers the loss), a term
the method never states.
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
    arpo_scale: float = 0.9,
    arpo_rate: float = 0.4,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    pair_normalizer: float | None = None,
    token_normalizer: float | torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> PreferenceLoss:
    """The CPO objective and its TRL-named variants. All tensor inputs (B,); log-probs are sums over completions.

    `simpo_gamma` is TRL's absolute margin (the SimPO paper's gamma/beta ratio r gives simpo_gamma = r * beta).
    `pair_normalizer` defaults to B (a mean over the pairs of this batch). `pair_weights` (B,), when given,
    weigh each pair's preference term and its chosen side's NLL (a source with several pairs counts once: the
    selection stage writes the weights); the normalizers are then the step's weight sums, which the caller passes.
    """
    if pair_weights is None:
        nll = nll_loss(chosen_logps, chosen_tokens, token_normalizer)
    else:
        if token_normalizer is None:
            token_normalizer = (pair_weights * chosen_tokens).sum()
        nll = nll_loss(chosen_logps * pair_weights, chosen_tokens, token_normalizer)
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
    if loss_type == "arpo":
        rejected = rejected * arpo_rejection_weight(
            chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, arpo_scale, arpo_rate
        )
    logits = chosen - rejected  # (B,)

    if loss_type in ("sigmoid", "dpo", "arpo"):
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

    if pair_weights is not None:
        losses = losses * pair_weights
        if pair_normalizer is None:
            pair_normalizer = float(pair_weights.sum())
    preference = losses.sum() / (pair_normalizer if pair_normalizer is not None else max(len(losses), 1))
    return PreferenceLoss(
        loss=nll if loss_type == "sft" else preference + cpo_alpha * nll,
        preference=preference,
        nll=nll,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


def arpo_rejection_weight(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    arpo_scale: float,
    arpo_rate: float,
) -> torch.Tensor:
    """ARPO's tau per pair (B,), detached (module docstring): min(scale * exp(rate * |avg_w - avg_l|) - 1, 1)."""
    gap = (chosen_logps / chosen_tokens.clamp(min=1) - rejected_logps / rejected_tokens.clamp(min=1)).abs()
    return (arpo_scale * torch.exp(arpo_rate * gap.detach()) - 1).clamp(max=1)
