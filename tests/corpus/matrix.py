"""Planted bugs in matrix derivations, each beside its fixed twin.

A dense layer in PyTorch's `nn.Linear` convention: one sample per row, X is N×in, W is out×in,
b has `out` entries, Ŷ = X·Wᵀ + b, loss = mean((Ŷ − Y)²) over every entry. Its gradients:

    dloss/dŶ = 2(Ŷ − Y)/(N·out)     dloss/dW = dloss/dŶᵀ · X     dloss/db = Σ_rows dloss/dŶ

A transposed gradient of a square W has the right shape and wrong values; of the seed's 6×5 W1
it has the transposed shape 5×6; a bias gradient that forgets to sum over the batch has shape
N×out instead of out. The harness blames the manual gradient for all three.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from backprop_check import case, node

EXPECTED = {
    "matrix_square_transpose": ("mismatch", "manual"),
    "matrix_square_transpose_fixed": ("ok", None),
    "matrix_nonsquare_transpose": ("mismatch", "manual"),
    "matrix_nonsquare_transpose_fixed": ("ok", None),
    "matrix_bias_missing_batch_sum": ("mismatch", "manual"),
    "matrix_bias_missing_batch_sum_fixed": ("ok", None),
    "matrix_mean_over_rows_only": ("mismatch", "manual"),
    "matrix_mean_over_rows_only_fixed": ("ok", None),
    "matrix_ridge_penalty_missing_2": ("mismatch", "manual"),
    "matrix_ridge_penalty_missing_2_fixed": ("ok", None),
}


def fixed(*shape: int, seed: int) -> Tensor:
    """A reproducible standard-normal tensor: data that is the same on every run."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def weight(*shape: int) -> Callable[[torch.Generator], Tensor]:
    """A params= callable: a standard-normal initial value from the harness's generator."""
    return lambda g: torch.randn(*shape, generator=g, dtype=torch.float64)


def dense_mse(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """Ŷ = X·Wᵀ + b, loss = mean((Ŷ − Y)²)."""
    y_hat = node("y_hat", X @ W.T + b)
    return ((y_hat - Y) ** 2).mean()


def dense_backward(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """dloss/dŶ for `dense_mse`."""
    y_hat = X @ W.T + b
    return 2 * (y_hat - Y) / y_hat.numel()


# --- transposed gradient of a square matrix: same shape, wrong values -----------------------------

SQUARE = {
    "params": {"W": weight(3, 3), "b": weight(3)},
    "data": {"X": fixed(4, 3, seed=1), "Y": fixed(4, 3, seed=2)},
}


@case(**SQUARE)
def matrix_square_transpose(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_square_transpose.manual
def matrix_square_transpose_manual(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    dloss_dyhat = dense_backward(W, b, X, Y)
    dloss_dW = X.T @ dloss_dyhat  # BUG: that is (dloss/dŶᵀ · X)ᵀ, W's gradient transposed
    return {"W": dloss_dW, "b": dloss_dyhat.sum(dim=0), "y_hat": dloss_dyhat}


@case(**SQUARE)
def matrix_square_transpose_fixed(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_square_transpose_fixed.manual
def matrix_square_transpose_fixed_manual(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    dloss_dyhat = dense_backward(W, b, X, Y)
    dloss_dW = dloss_dyhat.T @ X
    return {"W": dloss_dW, "b": dloss_dyhat.sum(dim=0), "y_hat": dloss_dyhat}


# --- transposed gradient of the seed's 6×5 W1: the shape is 5×6 -----------------------------------

NONSQUARE = {
    "params": {"W": weight(6, 5), "b": weight(6)},
    "data": {"X": fixed(4, 5, seed=3), "Y": fixed(4, 6, seed=4)},
}


@case(**NONSQUARE)
def matrix_nonsquare_transpose(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_nonsquare_transpose.manual
def matrix_nonsquare_transpose_manual(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    dloss_dyhat = dense_backward(W, b, X, Y)
    dloss_dW = X.T @ dloss_dyhat  # BUG: 5×6, W is 6×5
    return {"W": dloss_dW, "b": dloss_dyhat.sum(dim=0), "y_hat": dloss_dyhat}


@case(**NONSQUARE)
def matrix_nonsquare_transpose_fixed(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_nonsquare_transpose_fixed.manual
def matrix_nonsquare_transpose_fixed_manual(
    W: Tensor, b: Tensor, X: Tensor, Y: Tensor
) -> dict[str, Tensor]:
    dloss_dyhat = dense_backward(W, b, X, Y)
    dloss_dW = dloss_dyhat.T @ X
    return {"W": dloss_dW, "b": dloss_dyhat.sum(dim=0), "y_hat": dloss_dyhat}


# --- bias without the sum over the batch: shape N×out instead of out ------------------------------

BIAS = {
    "params": {"W": weight(2, 3), "b": weight(2)},
    "data": {"X": fixed(4, 3, seed=5), "Y": fixed(4, 2, seed=6)},
}


@case(**BIAS)
def matrix_bias_missing_batch_sum(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_bias_missing_batch_sum.manual
def matrix_bias_missing_batch_sum_manual(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    dloss_dyhat = dense_backward(W, b, X, Y)
    dloss_db = dloss_dyhat  # BUG: b is broadcast over the 4 rows, its gradient sums them
    return {"W": dloss_dyhat.T @ X, "b": dloss_db, "y_hat": dloss_dyhat}


@case(**BIAS)
def matrix_bias_missing_batch_sum_fixed(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_bias_missing_batch_sum_fixed.manual
def matrix_bias_missing_batch_sum_fixed_manual(
    W: Tensor, b: Tensor, X: Tensor, Y: Tensor
) -> dict[str, Tensor]:
    dloss_dyhat = dense_backward(W, b, X, Y)
    dloss_db = dloss_dyhat.sum(dim=0)
    return {"W": dloss_dyhat.T @ X, "b": dloss_db, "y_hat": dloss_dyhat}


# --- mean over every entry, derivative divided by the batch size only: `out` times too large ------


@case(**BIAS)
def matrix_mean_over_rows_only(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_mean_over_rows_only.manual
def matrix_mean_over_rows_only_manual(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    y_hat = X @ W.T + b
    N = X.shape[0]
    dloss_dyhat = 2 * (y_hat - Y) / N  # BUG: .mean() divides by all N·out entries
    return {"W": dloss_dyhat.T @ X, "b": dloss_dyhat.sum(dim=0), "y_hat": dloss_dyhat}


@case(**BIAS)
def matrix_mean_over_rows_only_fixed(W: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return dense_mse(W, b, X, Y)


@matrix_mean_over_rows_only_fixed.manual
def matrix_mean_over_rows_only_fixed_manual(
    W: Tensor, b: Tensor, X: Tensor, Y: Tensor
) -> dict[str, Tensor]:
    y_hat = X @ W.T + b
    dloss_dyhat = 2 * (y_hat - Y) / y_hat.numel()
    return {"W": dloss_dyhat.T @ X, "b": dloss_dyhat.sum(dim=0), "y_hat": dloss_dyhat}


# --- ridge penalty λ·‖w‖² differentiated as λ·w: d(w²) written as w -------------------------------

LAMBDA = 0.1
RIDGE = {
    "params": {"w": weight(3)},
    "data": {"X": fixed(4, 3, seed=7), "y": fixed(4, seed=8)},
}


def ridge(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """ŷ = X·w, loss = mean((ŷ − y)²) + λ·‖w‖²."""
    y_hat = node("y_hat", X @ w)
    return ((y_hat - y) ** 2).mean() + LAMBDA * (w**2).sum()


@case(**RIDGE)
def matrix_ridge_penalty_missing_2(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return ridge(w, X, y)


@matrix_ridge_penalty_missing_2.manual
def matrix_ridge_penalty_missing_2_manual(w: Tensor, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    y_hat = X @ w
    dloss_dyhat = 2 * (y_hat - y) / y.numel()
    dpenalty_dw = LAMBDA * w  # BUG: d(λ·w²)/dw is 2λ·w
    return {"w": X.T @ dloss_dyhat + dpenalty_dw, "y_hat": dloss_dyhat}


@case(**RIDGE)
def matrix_ridge_penalty_missing_2_fixed(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    return ridge(w, X, y)


@matrix_ridge_penalty_missing_2_fixed.manual
def matrix_ridge_penalty_missing_2_fixed_manual(w: Tensor, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    y_hat = X @ w
    dloss_dyhat = 2 * (y_hat - y) / y.numel()
    dpenalty_dw = 2 * LAMBDA * w
    return {"w": X.T @ dloss_dyhat + dpenalty_dw, "y_hat": dloss_dyhat}
