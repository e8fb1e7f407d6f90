"""`assert_gradients` inside ordinary tests: it passes quietly, and fails with the table."""
from __future__ import annotations

import pytest
import torch

import backprop_check
from backprop_check import Report, assert_gradients


def loss(w, x, y):  # noqa: ANN001, ANN201
    return (w * x - y) ** 2


def test_agreeing_gradients_return_the_report() -> None:
    report = assert_gradients(loss, params={"w": 1.0}, data={"x": 3.0, "y": 2.0}, manual=lambda w, x, y: {"w": 2 * (w * x - y) * x}, points=1)
    assert isinstance(report, Report)
    assert [(r.device, r.dtype, r.verdict) for r in report.results] == [("cpu", "float64", "ok"), ("cpu", "float32", "ok")]


def test_a_wrong_manual_gradient_raises_with_the_table_and_the_culprit() -> None:
    with pytest.raises(AssertionError) as raised:
        assert_gradients(loss, params={"w": 1.0}, data={"x": 3.0, "y": 2.0}, manual=lambda w, x, y: {"w": 2 * (w * x - y)},
                         dtypes=["float64"], points=0, name="forgot_x")
    message = str(raised.value)
    assert message.startswith("gradients of 'forgot_x': 1 mismatch\n")
    assert "case" in message and "culprit" in message  # the table's header
    assert "forgot_x[cpu-float64]: manual is the odd one out at the given point" in message


def test_without_a_manual_gradient_autograd_is_checked_two_way() -> None:
    report = assert_gradients(lambda W, X: torch.tanh(X @ W).sum(), params={"W": [[0.5], [-1.0]]}, data={"X": [[1.0, 2.0]]},
                              dtypes=["float64"], points=1)
    assert report.summary["ok"] == 1


def test_a_broken_case_raises_too() -> None:
    with pytest.raises(AssertionError, match="1 error"):
        assert_gradients(lambda w, x: w * x, params={"w": [1.0, 2.0]}, data={"x": 3.0}, dtypes=["float64"], points=0)


def test_case_options_are_passed_on() -> None:
    with pytest.raises(AssertionError, match="expected loss = 5"):
        assert_gradients(loss, params={"w": 1.0}, data={"x": 3.0, "y": 2.0}, expect={"loss": 5.0}, dtypes=["float64"], points=0)


def test_it_is_public_api() -> None:
    assert "assert_gradients" in backprop_check.__all__
    assert backprop_check.__all__ == sorted(backprop_check.__all__)
