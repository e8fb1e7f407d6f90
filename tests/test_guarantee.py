"""The default mode's guarantee, as the README states it, checked on planted bugs.

One element of one weight matrix of a softmax cross-entropy layer (integer labels) is wrong by
a relative 1e-3 in float64 or 5e-2 in float32: in the hand-written gradient (three-way, the
culprit is manual) or in a custom backward that autograd runs (two-way, the culprit is
autograd). Whatever the element (a small one, a median one, the largest) and whatever the size
(10k to 1M elements), the default mode reports a mismatch, names the culprit and the element.
The same models without the bug are ok at several random points in both dtypes.
"""
from __future__ import annotations

import torch
import pytest

from backprop_check import case, run

RELATIVE = {"float64": 1e-3, "float32": 5e-2}


def layer(inputs: int, outputs: int, batch: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W": torch.randn(inputs, outputs, generator=gen, dtype=torch.float64) / inputs**0.5,
        "X": torch.randn(batch, inputs, generator=gen, dtype=torch.float64),
        "y": torch.randint(0, outputs, (batch,), generator=gen),
    }


def true_gradient(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d cross_entropy(X·W, y) / dW, by hand: Xᵀ (softmax − onehot) / N."""
    p = torch.softmax(X @ W, dim=1)
    p[torch.arange(len(y)), y] -= 1
    return X.T @ p / len(y)


def three_way(model: dict[str, torch.Tensor], element: int | None, factor: float):
    def cross_entropy(W, X, y):
        return torch.nn.functional.cross_entropy(X @ W, y)

    checked = case(params={"W": model["W"]}, data={"X": model["X"], "y": model["y"]}, name="three_way")(cross_entropy)

    @checked.manual
    def by_hand(W, X, y):
        g = true_gradient(W, X, y)
        if element is not None:
            g.view(-1)[element] *= factor
        return {"W": g}

    return checked


def two_way(model: dict[str, torch.Tensor], element: int | None, factor: float):
    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, X, W):
            ctx.save_for_backward(X, W)
            return X @ W

        @staticmethod
        def backward(ctx, grad):
            X, W = ctx.saved_tensors
            grad_W = X.T @ grad
            if element is not None:
                grad_W.view(-1)[element] *= factor
            return grad @ W.T, grad_W

    def cross_entropy(W, X, y):
        return torch.nn.functional.cross_entropy(Linear.apply(X, W), y)

    return case(params={"W": model["W"]}, data={"X": model["X"], "y": model["y"]}, name="two_way")(cross_entropy)


def planted(model: dict[str, torch.Tensor], where: str) -> int:
    """The flat element at a magnitude quantile of the true gradient: 'small' (the 10th
    percentile), 'median' or 'largest'."""
    magnitude = true_gradient(model["W"], model["X"], model["y"]).abs().reshape(-1)
    order = torch.argsort(magnitude)
    return int(order[{"small": len(order) // 10, "median": len(order) // 2, "largest": -1}[where]])


SIZES = {"10k": (100, 100), "100k": (320, 320), "1M": (1000, 1000)}
CASES = [
    pytest.param(size, where, dtype, id=f"{size}-{where}-{dtype}")
    for size, wheres in (("10k", ("small", "median", "largest")), ("100k", ("small", "median")), ("1M", ("small",)))
    for where in wheres
    for dtype in ("float64", "float32")
]


@pytest.mark.parametrize("build, culprit", [(three_way, "manual"), (two_way, "autograd")], ids=["three-way", "two-way"])
@pytest.mark.parametrize("size, where, dtype", CASES)
def test_one_wrong_element_is_caught_named_and_blamed(build, culprit, size, where, dtype):
    model = layer(*SIZES[size])
    element = planted(model, where)
    checked = build(model, element, 1 + RELATIVE[dtype])
    result = run([checked], devices=["cpu"], dtypes=[dtype], points=1).results[0]
    assert (result.verdict, result.culprit) == ("mismatch", culprit), result.message
    rows, columns = divmod(element, model["W"].shape[1])
    assert result.checks[0].label == f"W[{rows}, {columns}]"


@pytest.mark.parametrize("build", [three_way, two_way], ids=["three-way", "two-way"])
@pytest.mark.parametrize("size", ["10k", "100k"])
def test_the_same_models_without_the_bug_agree_at_random_points_in_both_dtypes(build, size):
    report = run([build(layer(*SIZES[size], seed=1), None, 1.0)], devices=["cpu"], points=3)
    assert [r.verdict for r in report.results] == ["ok", "ok"], [r.message for r in report.results]


def test_each_result_says_how_each_tensor_was_checked():
    model = layer(100, 100)
    result = run([three_way(model, None, 1.0)], devices=["cpu"], dtypes=["float64"], points=0).results[0]
    coverage = result.to_dict()["checks"][0]["coverage"]
    assert coverage["elements"] == coverage["manual_vs_autograd"] == 10_000
    assert 0 < coverage["numerical"] < 10_000 and coverage["directions"] >= 2


def test_a_gradient_that_is_exactly_zero_is_no_false_alarm():
    """A bias cancelled by batch normalization: dloss/db1 = 0, the sources give ±1e-18."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 1, generator=gen, dtype=torch.float64)

    def normalized(W1, b1, W2, X, y):
        h = X @ W1 + b1
        h = (h - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt()
        return ((torch.tanh(h) @ W2 - y) ** 2).mean()

    params = {"W1": torch.randn(4, 8, generator=gen, dtype=torch.float64), "b1": torch.randn(8, generator=gen, dtype=torch.float64),
              "W2": torch.randn(8, 1, generator=gen, dtype=torch.float64)}
    checked = case(params=params, data={"X": X, "y": y}, name="batch_norm_bias")(normalized)

    @checked.manual
    def by_autograd_twice(W1, b1, W2, X, y):  # an exact gradient computed another way: by a second graph
        values = {k: v.clone().requires_grad_(True) for k, v in {"W1": W1, "b1": b1, "W2": W2}.items()}
        with torch.enable_grad():
            loss = normalized(values["W1"], values["b1"], values["W2"], X, y)
            grads = torch.autograd.grad(loss * 1.0, list(values.values()))
        return dict(zip(values, grads))

    report = run([checked], devices=["cpu"], points=2)
    assert [r.verdict for r in report.results] == ["ok", "ok"], [r.message for r in report.results]


def test_integer_numbers_are_redrawn_like_floats_so_a_forgotten_factor_shows():
    @case(params={"w": 1}, data={"x": 1, "y": 2})
    def linear(w, x, y):
        return (w * x - y) ** 2

    linear.manual(lambda w, x, y: {"w": 2 * (w * x - y)})  # forgets the factor x
    result = run([linear], devices=["cpu"], dtypes=["float64"]).results[0]
    assert (result.verdict, result.culprit) == ("mismatch", "manual")


def test_integer_labels_stay_fixed_and_the_result_says_so():
    model = layer(6, 3)
    result = run([three_way(model, None, 1.0)], devices=["cpu"], dtypes=["float64"], points=1).results[0]
    assert result.verdict == "ok"
    assert any("'y'" in note and "held fixed" in note for note in result.notes)


def test_a_complex_value_is_checked_never_cut_to_its_real_part():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):  # noqa: ANN001, ANN205
            ctx.save_for_backward(z)
            return z * z

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (z,) = ctx.saved_tensors
            return g * 2 * z  # forgets .conj(): torch's convention needs g·conj(2z)

    @case(params={"z": [0.3 + 1.2j, -0.5 + 0.1j]})
    def power(z):
        return Square.apply(z).real.sum()

    result = run([power], devices=["cpu"], dtypes=["float64"]).results[0]
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "dloss/dz[0].imag" in result.message


def test_the_text_report_says_how_a_large_tensor_was_checked():
    from backprop_check.formats import text

    report = run([three_way(layer(100, 100), None, 1.0)], devices=["cpu"], dtypes=["float64"], points=0)
    rendered = text.render(report)
    assert "coverage: three_way: W (10000 elements): manual against autograd at every element" in rendered


@pytest.mark.parametrize("build, culprit", [(three_way, "manual"), (two_way, "autograd")], ids=["three-way", "two-way"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_full_mode_finds_one_wrong_element_by_replaying_the_forward(build, culprit, dtype, monkeypatch):
    """--full estimates all 10,000 elements, each from the forward replayed at its perturbed
    points (sources/replay.py); the replay is checked, so nothing here falls back to vmap."""
    from backprop_check.sources import numerical

    def never(self, targets, flat, batch):  # noqa: ANN001, ANN202 - vmap of the whole forward
        raise AssertionError("the whole forward was batched by vmap, not replayed")

    model = layer(*SIZES["10k"])
    element = planted(model, "small")  # the 10th percentile of |gradient|
    monkeypatch.setattr(numerical.Batched, "__call__", never)
    result = run([build(model, element, 1 + RELATIVE[dtype])], devices=["cpu"], dtypes=[dtype], points=1, full=True).results[0]
    assert (result.verdict, result.culprit) == ("mismatch", culprit), result.message
    rows, columns = divmod(element, model["W"].shape[1])
    assert result.checks[0].label == f"W[{rows}, {columns}]"
    correct = run([build(layer(*SIZES["10k"], seed=1), None, 1.0)], devices=["cpu"], dtypes=[dtype], points=2, full=True)
    assert [r.verdict for r in correct.results] == ["ok"], [r.message for r in correct.results]


class _Doubled(torch.autograd.Function):
    """Identity forward, a backward 2× the truth: every element of the gradient behind it wrong."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return 2 * g


@pytest.mark.parametrize(
    "fn, inputs, wrt",
    [
        pytest.param(
            lambda ids, weight: _Doubled.apply(torch.nn.functional.embedding(ids, weight)),
            (torch.tensor([[0, 11, 5, 6], [3, 7, 9, 2]]), torch.randn(12, 5, generator=torch.Generator().manual_seed(20), dtype=torch.float64)),
            ["weight"],
            id="embedding-with-unused-rows",
        ),
        pytest.param(
            lambda x, w: _Doubled.apply(torch.relu(x @ w)),
            (torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
             torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - torch.tensor([10.0] * 3 + [0.0] * 7, dtype=torch.float64)),
            ["w"],
            id="relu-layer-with-dead-units",
        ),
    ],
)
def test_a_wrong_gradient_with_exact_zeros_beside_it_is_caught(fn, inputs, wrt):
    """A sampled tensor whose directions disagree has every element estimated, then its loose
    ones (the exact zeros: no bar is below a fraction of 0) again: the second store kept only the
    zeros as estimated, and the ×2 elsewhere passed unseen."""
    import backprop_check as bc

    (result,) = bc.check(fn, inputs, dtypes=["float64"], points=0, wrt=wrt).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd"), result.message
