"""Broken cases in a file that imports: each is an error, and its well-formed neighbour runs.

- a forward pass that raises (the seed's W1·X with X given as rows, so the shapes do not meet),
- a forward pass that returns a loss per sample instead of one number (forgot the mean),
- a forward pass whose loss is NaN at every point (the mean of an empty slice).
"""
from __future__ import annotations

import torch
from torch import Tensor

from backprop_check import case, node

EXPECTED = {
    "broken_forward_raises": ("error", None),
    "broken_non_scalar_loss": ("error", None),
    "broken_nan_loss": ("error", None),
    "broken_neighbour_ok": ("ok", None),
}


@case(
    params={"W1": lambda g: torch.randn(6, 5, generator=g, dtype=torch.float64)},
    data={"X": torch.ones(4, 5, dtype=torch.float64), "Y": torch.zeros(6, 4, dtype=torch.float64)},
)
def broken_forward_raises(W1: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    h = W1 @ X  # (6×5) @ (4×5): X holds samples as rows here, the seed's W1·X needs columns
    return ((h - Y) ** 2).mean()


@case(params={"w": 0.0}, data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]})
def broken_non_scalar_loss(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    y_hat = node("y_hat", w * X)
    return (y_hat - Y) ** 2  # one loss per sample: the .mean() is missing


@broken_non_scalar_loss.manual
def broken_non_scalar_loss_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    return {"w": (2 * (w * X - Y) * X).mean()}


@case(params={"w": 0.0}, data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]})
def broken_nan_loss(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    n_train = len(Y)  # meant to hold back the last sample for validation: len(Y) - 1
    validation = (w * X - Y)[n_train:]  # empty
    return (validation**2).mean()  # the mean of nothing is NaN


@case(params={"w": 0.0}, data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]})
def broken_neighbour_ok(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    y_hat = node("y_hat", w * X)
    return ((y_hat - Y) ** 2).mean()


@broken_neighbour_ok.manual
def broken_neighbour_ok_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    dloss_dyhat = 2 * (w * X - Y) / X.numel()
    return {"w": (dloss_dyhat * X).sum(), "y_hat": dloss_dyhat}
