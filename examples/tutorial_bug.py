"""The gradient-descent tutorial's hand-written gradient (seed 001), checked.

The tutorial fits f(x) = w·x to X = [1, 2, 3, 4], Y = 2·X with numpy, from w = 0. Its loss is
the mean squared error, J = mean((w·x − y)²), whose derivative it writes on the board as

    dJ/dw = 1/N · Σ 2x·(w·x − y)

and then codes as

    np.dot(2*x, y_pred - y).mean()

The dot product already sums over the N samples and returns a single number, so the `.mean()`
that was meant to supply 1/N averages one number and does nothing: the code returns
Σ 2x·(w·x − y) = −120 at w = 0, four times the true −30. Gradient descent still converged,
only with steps four times too large, so nothing looked wrong. When the tutorial then replaced
its gradient with autograd, the same learning rate took the true, four times smaller steps and
was "not completely correct" after 20 iterations, and the tutorial blamed backpropagation for
being "not as exact as the numerical gradient computation".

Run `backprop-check run examples/tutorial_bug.py`: autograd and finite differences agree on −30,
the manual gradient says −120, so the manual gradient is the culprit, off by a factor N = 4.
The fix is to divide by N instead: `np.dot(2*x, y_pred - y) / len(x)`.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from backprop_check import case


def forward(w: float, x: np.ndarray) -> np.ndarray:
    return w * x


def gradient(x: np.ndarray, y: np.ndarray, y_pred: np.ndarray) -> np.floating:
    # The tutorial's line, unchanged: J = 1/N * (w*x - y)**2, dJ/dw = 1/N * 2x * (w*x - y)
    return np.dot(2 * x, y_pred - y).mean()


@case(
    params={"w": 0.0},
    data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]},
    expect={"loss": 30.0, "w": -30.0},
)
def tutorial_mse(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """f = w·x, J = mean((f − y)²), as the tutorial's `loss(y, y_predicted)`."""
    y_pred = w * X
    return ((y_pred - Y) ** 2).mean()


@tutorial_mse.manual
def tutorial_gradient(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, np.floating]:
    x, y = X.cpu().numpy(), Y.cpu().numpy()  # the tutorial works on numpy arrays
    y_pred = forward(float(w), x)
    return {"w": gradient(x, y, y_pred)}
