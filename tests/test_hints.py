"""Hints: a wrong manual gradient that follows a pattern is named by its pattern."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from backprop_check import case, node, run
from backprop_check.formats import FORMATS

ROOT = Path(__file__).resolve().parents[1]
CPU64 = dict(devices=["cpu"], dtypes=["float64"], points=1)


def linear_case(manual: Callable[..., dict[str, Any]]) -> Any:
    @case(params={"w": 1.0}, data={"x": 1.0, "y": 2.0})
    def linear(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_hat = node("y_hat", w * x)
        s = node("s", y_hat - y)
        return s**2

    linear.manual(manual)
    return linear


def mse_case(manual: Callable[..., dict[str, Any]]) -> Any:
    @case(params={"w": 0.0}, data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]})
    def mse(w: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return ((w * X - Y) ** 2).mean()

    mse.manual(manual)
    return mse


def matrix_case(manual: Callable[..., dict[str, Any]], rows: int = 3) -> Any:
    """loss = Σ (x·Wᵀ − y)² with W rows×3: square for rows = 3."""

    @case(
        params={"W": lambda g: torch.randn(rows, 3, generator=g, dtype=torch.float64)},
        data={"x": [[1.0, 2.0, -1.0], [0.5, 0.0, 2.0]], "y": lambda g: torch.randn(2, rows, generator=g, dtype=torch.float64)},
    )
    def matrix(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x @ W.T - y) ** 2).sum()

    matrix.manual(manual)
    return matrix


def true_matrix_gradient(W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (2 * (x @ W.T - y)).T @ x


def test_a_factor_2_is_called_a_squares_only_where_a_square_is_in_sight() -> None:
    # linear_case's forward returns s**2: a missing 2 there is d(s²)/ds's
    (square,) = hints_of(linear_case(lambda w, x, y: {"w": (w * x - y) * x}))
    assert "a missing factor 2 (d(s²)/ds = 2s)" in square

    @case(params={"x": [1.0, -2.0, 3.0]}, data={"mask": [1.0, 0.0, 1.0]})
    def dropout(x, mask):
        return (x * mask / 0.5).sum()  # inverted dropout at p = ½: no square anywhere

    dropout.manual(lambda x, mask: {"x": x * 0 + mask})  # the 1/p forgotten
    (hint,) = hints_of(dropout)
    assert "half the true gradient: a missing factor 2" in hint and "d(s²)" not in hint


def hints_of(target: Any) -> list[str]:
    (result,) = run(target, **CPU64).results
    return result.hints


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param(linear_case(lambda w, x, y: {"w": 4 * (w * x - y) * x}), "twice the true gradient", id="times-2"),
        pytest.param(linear_case(lambda w, x, y: {"w": (w * x - y) * x}), "half the true gradient: a missing factor 2", id="times-half"),
        pytest.param(linear_case(lambda w, x, y: {"w": 2 * (y - w * x) * x}), "the sign flipped", id="times-minus-1"),
        pytest.param(
            mse_case(lambda w, X, Y: {"w": (2 * X * (w * X - Y)).mean() / 4}),
            "1/4 of the true gradient, with N = 4 = X.shape[0]",
            id="times-1-over-N",
        ),
        pytest.param(
            str(ROOT / "examples" / "tutorial_bug.py"),
            "4× the true gradient, with N = 4 = X.shape[0]: the 1/N of a mean over the batch is missing",
            id="tutorial-mean-of-a-dot-product-is-N-times-too-big",
        ),
        pytest.param(
            matrix_case(lambda W, x, y: {"W": 3.7 * true_matrix_gradient(W, x, y)}),
            "3.7× the true gradient in every element",
            id="any-constant-factor-over-a-tensor",
        ),
        pytest.param(
            matrix_case(lambda W, x, y: {"W": true_matrix_gradient(W, x, y).T}),
            "is the transpose of the true gradient (W is square",
            id="square-matrix-transposed",
        ),
        pytest.param(
            matrix_case(lambda W, x, y: {"W": true_matrix_gradient(W, x, y).T}, rows=2),
            "a gradient has the shape of its parameter: multiply the chain for the manual dloss/dW in the other order",
            id="wrong-shape-transposed",
        ),
        pytest.param(
            mse_case(lambda w, X, Y: {"w": 2 * X * (w * X - Y) / 4}),
            "w is shared by all 4 samples, so dloss/dw is the sum of their per-sample shares",
            id="missing-sum-over-the-batch",
        ),
        pytest.param(
            mse_case(lambda w, X, Y: {"w": 2 * X * (w * X - Y)}),
            "the loss is a mean over the 4 samples, so dloss/dw is the mean of their per-sample shares",
            id="missing-mean-over-the-batch",
        ),
        pytest.param(
            linear_case(lambda w, x, y: {"w": 2 * (w * x - y)}),
            "right at the given point (w = 1, x = 1) but wrong at the random point 1",
            id="forgot-x-which-is-1-at-the-given-point",
        ),
    ],
)
def test_a_pattern_gets_its_hint(target: Any, expected: str) -> None:
    hints = hints_of(target)
    assert any(expected in hint for hint in hints), hints


def test_the_forgotten_factor_is_named() -> None:
    (hint,) = hints_of(linear_case(lambda w, x, y: {"w": 2 * (w * x - y)}))
    assert "multiplied by x it matches" in hint


def test_one_factor_through_several_nodes_is_one_hint() -> None:
    def manual(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        s = w * x - y
        return {"w": s * x, "y_hat": s, "s": s}  # d(s²)/ds written as s

    (hint,) = hints_of(linear_case(manual))
    assert hint.startswith("the manual dloss/ds, dloss/dy_hat, dloss/dw are each half the true gradient")


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x}), id="correct-linear"),
        pytest.param(str(ROOT / "cases" / "two_layer.py"), id="correct-two-layer"),
    ],
)
def test_a_correct_case_gets_no_hint(target: Any) -> None:
    report = run(target, **CPU64)
    assert [r.verdict for r in report.results] == ["ok"] * len(report.results)
    assert all(r.hints == [] for r in report.results)


def test_a_wrong_scalar_with_no_pattern_gets_no_hint() -> None:
    # One number is always some multiple of another: only named factors are worth a hint.
    assert hints_of(linear_case(lambda w, x, y: {"w": 2.6 * (w * x - y) * x})) == []


def test_hints_appear_in_the_text_and_json_reports() -> None:
    report = run(str(ROOT / "examples" / "tutorial_bug.py"), devices=["cpu"], dtypes=["float32"], points=1)
    text = FORMATS["text"](report)
    document = json.loads(FORMATS["json"](report))
    assert "    hint: the manual dloss/dw is 4× the true gradient" in text
    assert document["results"][0]["hints"][0].startswith("the manual dloss/dw is 4× the true gradient, with N = 4")


def test_a_batch_dimension_that_does_not_sum_to_the_gradient_gets_no_batch_hint() -> None:
    hints = hints_of(mse_case(lambda w, X, Y: {"w": 3 * X}))
    assert not any("batch dimension" in hint for hint in hints)


def _sum_without_the_1_over_n(w: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]:
    return {"w": (2 * X * (w * X - Y)).sum()}


def _the_tutorials_empty_mean(w: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> dict[str, Any]:
    return {"w": torch.dot(2 * X, w * X - Y).mean()}


@pytest.mark.parametrize("manual, said", [
    pytest.param(_sum_without_the_1_over_n, False, id="a-sum-with-no-mean-gets-no-word-about-mean"),
    pytest.param(_the_tutorials_empty_mean, True, id="a-mean-of-a-dot-product-is-named"),
])
def test_the_mean_of_a_sum_is_mentioned_only_where_the_manual_code_has_one(manual: Callable[..., dict[str, Any]], said: bool) -> None:
    (result,) = run([mse_case(manual)], **CPU64).results
    (hint,) = [h for h in result.hints if "4× the true gradient" in h]
    assert hint.endswith("the 1/N of a mean over the batch is missing" + (
        " (a .mean() of a number that is already a sum does nothing)" if said else ""))


def test_a_nan_gradient_from_the_branch_a_where_leaves_unused_is_named() -> None:
    import backprop_check as bc

    x = torch.tensor([1.5, -0.5, 2.0, -1.0], dtype=torch.float64)
    (result,) = bc.check(lambda a: torch.where(a > 0, torch.sqrt(a), 0.0), (x,), dtypes=["float64"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert any("is NaN at 2 of 4 elements where the true gradient is finite" in hint for hint in result.hints), result.hints
    # the fix the hint gives passes
    safe = bc.check(lambda a: torch.where(a > 0, torch.sqrt(torch.where(a > 0, a, 1.0)), 0.0), (x,), dtypes=["float64"], points=0)
    assert safe.exit_code == 0


def test_a_straight_through_estimator_is_named_as_a_surrogate() -> None:
    import backprop_check as bc

    class RoundSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return torch.round(x)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            return g  # identity: a surrogate, not the derivative of round

    x = torch.tensor([0.3, 1.2, -0.7, 2.4], dtype=torch.float64)
    (result,) = bc.check(RoundSTE.apply, (x,), dtypes=["float64"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert any("the true dloss/dx is 0 at every element" in hint and "straight-through" in hint for hint in result.hints), result.hints


def test_an_embeddings_padding_row_is_named_as_torchs_convention() -> None:
    """padding_idx's row gets a zero gradient by design though the forward reads it: flagged (as
    by torch's gradcheck) with the row and the convention named, as a function and as a module."""
    import backprop_check as bc

    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = torch.tensor([[0, 3, 5], [2, 0, 9]])
    (result,) = bc.check(
        lambda weight, ids: torch.nn.functional.embedding(ids, weight, padding_idx=0).tanh(), (weight, ids),
        dtypes=["float64"], points=0,
    ).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert any("row 0 of `weight` is read by an embedding with padding_idx=0" in hint for hint in result.hints), result.hints

    def build() -> torch.nn.Module:
        return torch.nn.Embedding(10, 4, padding_idx=2)

    @case(module=build, data={"ids": torch.tensor([[2, 3, 5], [2, 0, 9]])})
    def embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return (model(ids).tanh() ** 2).sum()

    (result,) = run([embed], **CPU64).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert any("row 2 of `weight`" in hint and "padding_idx=2" in hint for hint in result.hints), result.hints
    # without padding_idx the same embedding is right, and no such hint is made up
    plain = bc.check(lambda weight, ids: torch.nn.functional.embedding(ids, weight).tanh(), (weight, ids), dtypes=["float64"], points=0)
    assert plain.exit_code == 0


def test_a_missing_attention_scale_is_named_by_the_inputs_dimension() -> None:
    class Score(torch.autograd.Function):
        """s = q·k/√d for a head of d = 16, summed with weights; dq forgets the 1/√d."""

        @staticmethod
        def forward(ctx, q, k):  # noqa: ANN001, ANN205
            ctx.save_for_backward(q, k)
            return torch.tanh(q @ k.T / 4)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            q, k = ctx.saved_tensors
            inner = g * (1 - torch.tanh(q @ k.T / 4) ** 2)
            return inner @ k, inner.T @ q / 4  # dq without its 1/√16

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 16, generator=gen, dtype=torch.float64), torch.randn(1, 16, generator=gen, dtype=torch.float64)
    from backprop_check import check

    (result,) = check(Score.apply, (q, k), **CPU64).results
    assert any("4× the true gradient, with 4 = √16" in hint for hint in result.hints), result.hints


class _Scores(torch.autograd.Function):
    """s = q·kᵀ/√d for a head of d = 16; the backward forgets the 1/√d (in the rows `slipped`)."""

    slipped = slice(None)

    @staticmethod
    def forward(ctx, q, k):  # noqa: ANN001, ANN205
        ctx.save_for_backward(q, k)
        return q @ k.T / 4

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        q, k = ctx.saved_tensors
        dq = g @ k / 4
        dq[_Scores.slipped] *= 4
        return dq, g.T @ q / 4


@pytest.mark.parametrize(("slipped", "named"), [(slice(None), True), (slice(0, 1), False)], ids=["every-row", "one-row"])
def test_a_large_tensors_factor_is_named_from_the_elements_estimated(monkeypatch: pytest.MonkeyPatch, slipped: slice, named: bool) -> None:
    # 64×16 queries: the default check estimates a sample of dq's 1024 elements, not all of them;
    # a factor every estimated element shares is named (as for a whole tensor), one that a single
    # row has is none.
    monkeypatch.setattr(_Scores, "slipped", slipped)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 16, generator=gen, dtype=torch.float64), torch.randn(48, 16, generator=gen, dtype=torch.float64)
    from backprop_check import check

    (result,) = check(_Scores.apply, (q, k), dtypes=["float64"], points=0).results
    (dq,) = [c for c in result.checks if c.name == "q"]
    assert (result.verdict, result.culprit) == ("mismatch", "autograd"), result.message
    assert dq.coverage["numerical"] < dq.size  # sampled
    factor = [hint for hint in result.hints if "4× the true gradient" in hint]
    if named:
        assert factor == [
            "the autograd dloss/dq is 4× the true gradient, with 4 = √16 = √q.shape[1]: a 1/√d scale missing "
            "(as of q·k/√d) (at every element estimated numerically)"
        ], result.hints
    else:
        assert factor == [], result.hints
