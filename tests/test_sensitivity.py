"""Sensitivity: small real errors are flagged, correct gradients never are (issue 3, item 2).

gradcheck's default rtol of 1e-3 sees neither of the planted errors below.
"""
from __future__ import annotations

import pytest
import torch

from backprop_check import case, check, run

from .models import MODELS


def build(name: str, factor: float = 1.0):
    params, data, forward, gradient = MODELS[name]
    c = case(params=params, data=data, name=f"{name}-x{factor}")(forward)
    c.manual(lambda **kw: {k: v * factor for k, v in gradient(**kw).items()})
    return c


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_correct_gradients_pass_at_many_random_points(name, dtype):
    report = run([build(name)], devices=["cpu"], dtypes=[dtype], points=12, seed=7)
    (result,) = report.results
    assert result.verdict == "ok", result.message


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float64_flags_a_relative_error_of_one_in_a_million(name):
    (result,) = run([build(name, 1 + 1e-6)], devices=["cpu"], dtypes=["float64"], points=2).results
    assert (result.verdict, result.culprit) == ("mismatch", "manual"), result.message


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float32_alone_flags_a_relative_error_of_one_in_a_thousand(name):
    (result,) = run([build(name, 1 + 1e-3)], devices=["cpu"], dtypes=["float32"], points=2).results
    assert (result.verdict, result.culprit) == ("mismatch", "manual"), result.message


def saturated(factor: float):
    """tanh(w³)² at w = 1.88: tanh saturates and float32 keeps two digits of 1 − tanh²."""
    c = case(params={"w": 1.8802}, name=f"saturated-x{factor}")(lambda w: torch.tanh(w ** 3) ** 2)

    @c.manual
    def manual(w):
        t = torch.tanh(w ** 3)
        return {"w": 2 * t * (1 - t * t) * 3 * w * w * factor}

    return c


def test_float32_rounding_of_a_saturated_tanh_is_not_a_false_alarm():
    (result,) = run([saturated(1.0)], devices=["cpu"], dtypes=["float32"], points=0).results
    assert result.verdict == "ok", result.message
    assert result.checks[0].rounding > 0  # the allowance came from float32's rounding, not rtol


def test_a_wrong_factor_in_the_saturated_tanh_is_still_flagged_in_float64():
    (result,) = run([saturated(1.001)], devices=["cpu"], dtypes=["float64"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "manual")


def stock_cell(kind: type[torch.nn.Module], slip: float = 1.0):
    """A stock GRU or LSTM cell (3 → 4) at raw pixels (128 ± 50), seed 5: its gates saturate, and
    torch computes them in place (sigmoid_, tanh_), where float32's sigmoid of 17 is exactly 1.
    `slip` scales autograd's gradient of x[0, 0]."""
    torch.manual_seed(5)
    module = kind(3, 4).double()
    params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
    x = (torch.randn(2, 3, dtype=torch.float64) * 50 + 128).requires_grad_()
    scale = torch.ones(2, 3, dtype=torch.float64)
    scale[0, 0] = slip

    def fn(x, **given):
        if slip != 1.0 and x.requires_grad:
            x = x * 1  # a copy to hook, so the hook sees only this input's gradient
            x.register_hook(lambda g: g * scale.to(g.dtype))
        out = torch.func.functional_call(module.to(x.dtype), given, (x,))
        return out if isinstance(out, torch.Tensor) else out[0]

    return fn, {"x": x, **params}


@pytest.mark.parametrize("kind", [torch.nn.GRUCell, torch.nn.LSTMCell], ids=["GRUCell", "LSTMCell"])
def test_float32_rounding_inside_a_stock_rnn_cell_is_not_a_false_alarm(kind):
    # float32's gradient there is 0 where float64's is 8e-6: the cell's in-place sigmoid_ rounded
    # to 1, which the simulated rounding now moves too (it left ops written in place whole).
    fn, inputs = stock_cell(kind)
    (result,) = check(fn, inputs, dtypes=["float32"], points=0).results
    assert result.verdict == "ok", result.message


@pytest.mark.parametrize("kind", [torch.nn.GRUCell, torch.nn.LSTMCell], ids=["GRUCell", "LSTMCell"])
def test_a_slip_in_a_stock_rnn_cell_is_still_flagged_in_float32(kind):
    fn, inputs = stock_cell(kind, slip=1.01)
    (result,) = check(fn, inputs, dtypes=["float32"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd"), result.message
    assert "x[0, 0]" in result.message
