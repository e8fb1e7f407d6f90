"""Sensitivity: small real errors are flagged, correct gradients never are (issue 3, item 2).

gradcheck's default rtol of 1e-3 sees neither of the planted errors below.
"""
from __future__ import annotations

import pytest
import torch

from backprop_check import case, run

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
