"""WiSE-FT weight-space ensembles ("Robust fine-tuning of zero-shot models", Wortsman et al., CVPR 2022), as
"Sequence-level Large Language Model Training with Contrastive Preference Optimization" (anonymous ACL submission,
section 5, "Weight-space ensemble") uses them:

    theta(alpha) = alpha * theta_MLE + (1 - alpha) * theta_CPO        one model folder per alpha of a grid

Both models must share the architecture (same parameter names and shapes): CPO is trained from the MLE model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alma_r.data.files import save_dir_atomic
from alma_r.models.loading import load_model, load_tokenizer


def interpolate(
    mle: dict[str, torch.Tensor], cpo: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """alpha * mle + (1 - alpha) * cpo for every floating tensor, computed in float32 (or float64) and cast
    back to the tensor's dtype. Non-floating tensors (integer buffers) must be equal in both and are kept.

    The endpoints are copies, not the formula: in floating point 1*a + 0*b is not always a (b = inf or NaN
    gives NaN; a = -0.0 gives +0.0), a + alpha*(b - a) is not b at alpha = 1 (rounding of b - a), and casting
    through float32 of a float64 tensor could round. alpha = 1 and alpha = 0 must be the MLE and CPO models
    themselves, bit for bit."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if mle.keys() != cpo.keys():
        only = sorted(set(mle) ^ set(cpo))
        raise ValueError(f"the two models have different parameters, e.g. {only[:3]}")
    out = {}
    for name, a in mle.items():
        b = cpo[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"parameter {name}: MLE {tuple(a.shape)} {a.dtype} vs CPO {tuple(b.shape)} {b.dtype}"
            )
        if alpha == 1.0:
            out[name] = a.clone()
        elif alpha == 0.0:
            out[name] = b.clone()
        elif not a.is_floating_point():
            if not torch.equal(a, b):
                raise ValueError(f"non-floating tensor {name} differs between the two models")
            out[name] = a.clone()
        else:
            wide = torch.float64 if a.dtype == torch.float64 else torch.float32
            out[name] = (alpha * a.to(wide) + (1.0 - alpha) * b.to(wide)).to(a.dtype)
    return out


def alpha_dir_name(alpha: float) -> str:
    return f"alpha-{alpha:.2f}"


def wise_ft_grid(
    mle_dir: str | Path, cpo_dir: str | Path, alphas: list[float], out_root: Path
) -> dict[float, Path]:
    """One model folder (safetensors + tokenizer, written atomically) per alpha under out_root/alpha-<a>/.
    The tokenizer is the MLE model's (CPO never changes it)."""
    mle_model = load_model(str(mle_dir))
    mle = {k: v.detach().clone() for k, v in mle_model.state_dict().items()}
    cpo = {k: v.detach() for k, v in load_model(str(cpo_dir)).state_dict().items()}
    tokenizer = load_tokenizer(str(mle_dir))
    out = {}
    for alpha in alphas:
        mle_model.load_state_dict(interpolate(mle, cpo, alpha))

        def write(tmp: Path):
            mle_model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        out[alpha] = save_dir_atomic(Path(out_root) / alpha_dir_name(alpha), write)
    return out
