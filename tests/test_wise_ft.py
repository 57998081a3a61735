"""WiSE-FT: alpha 1 and 0 give back the MLE and CPO weights bit for bit; alphas between interpolate."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alma_r.models import synthetic
from alma_r.models.sequence.wise_ft import interpolate, wise_ft_grid

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_endpoints_are_bit_exact_and_midpoints_interpolate(tmp_path):
    mle_dir = synthetic.build_model(tmp_path / "mle", seed=0)
    cpo_dir = synthetic.build_model(tmp_path / "cpo", seed=1)
    folders = wise_ft_grid(mle_dir, cpo_dir, [1.0, 0.7, 0.0], tmp_path / "grid")
    mle, cpo = _weights(mle_dir), _weights(cpo_dir)
    for alpha, want in ((1.0, mle), (0.0, cpo)):
        got = _weights(folders[alpha])
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (alpha, name)
            assert got[name].dtype == want[name].dtype
    mid = _weights(folders[0.7])
    for name in mle:
        torch.testing.assert_close(mid[name], 0.7 * mle[name] + 0.3 * cpo[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(mid["lm_head.weight"], mle["lm_head.weight"])
    assert (folders[0.7] / "tokenizer.json").is_file() and not list(tmp_path.glob("grid/.alpha*"))


def test_endpoints_are_exact_where_the_formula_is_not():
    # 1*a + 0*b is NaN when b is inf, and +0.0 when a is -0.0: the endpoints must not go through it.
    a = torch.tensor([-0.0, 1.0, 3.0])
    b = torch.tensor([float("inf"), 2.0, float("nan")])
    one, zero = interpolate({"w": a}, {"w": b}, 1.0)["w"], interpolate({"w": a}, {"w": b}, 0.0)["w"]
    assert torch.equal(one.view(torch.int32), a.view(torch.int32))  # the sign bit of -0.0 too
    assert torch.equal(zero.view(torch.int32), b.view(torch.int32))
    assert not torch.equal((1.0 * a + 0.0 * b).view(torch.int32), a.view(torch.int32))


def test_bf16_weights_interpolate_in_float32_and_keep_their_dtype():
    a, b = torch.randn(64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    out = interpolate({"w": a}, {"w": b}, 0.5)["w"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (0.5 * a.float() + 0.5 * b.float()).bfloat16())


def test_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="different parameters"):
        interpolate({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="parameter a"):
        interpolate({"a": torch.zeros(1)}, {"a": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, 1.5)
