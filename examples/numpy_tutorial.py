"""The gradient-descent tutorial's numpy lesson (seed 001), checked as it was written.

The lesson fits f = w·x to X = [1, 2, 3, 4], Y = 2·X with numpy alone, from w = 0. Its loss is
the mean squared error J = 1/N·Σ(w·x − y)², whose derivative it writes as

    dJ/dw = 1/N · Σ 2x·(w·x − y)

and codes, in `gradient` below, as `np.dot(2*x, y_pred - y).mean()`. The dot product already
sums over the N samples and returns one number, so the `.mean()` meant to supply 1/N averages
that one number and does nothing: at w = 0 the code returns −120, four times the true −30.
Gradient descent still converged (steps four times too large are still downhill here), so
nothing looked wrong; when the next lesson swapped in autograd with the same learning rate,
the true, smaller steps were "not completely correct" after 20 iterations, and the tutorial
blamed backpropagation.

The tutorial's code is below as it was written, its training loop under `__main__` (so that
`python examples/numpy_tutorial.py` prints what the video shows). The case `tutorial` checks
it as a numpy case, `numpy=True`: the forward and the gradient get numpy arrays, exactly what
the tutorial passes them. `backprop-check run examples/numpy_tutorial.py` says: manual is the
odd one out, −120 against the numerical −30, 4× the true gradient with N = 4 = X.shape[0], the
1/N of the mean missing. `tutorial_fixed` is the same derivation, one local gradient a line,
dividing by N where the mean is: it agrees.
"""
from __future__ import annotations

import numpy as np

from backprop_check import case, node

# --- the tutorial's code, unchanged ---------------------------------------------------------

# Compute every step manually

# Linear regression
# f = w * x

# here : f = 2 * x
X = np.array([1, 2, 3, 4], dtype=np.float32)
Y = np.array([2, 4, 6, 8], dtype=np.float32)

w = 0.0

# model output
def forward(x):
    return w * x

# loss = MSE
def loss(y, y_pred):
    return ((y_pred - y)**2).mean()

# J = MSE = 1/N * (w*x - y)**2
# dJ/dw = 1/N * 2x(w*x - y)
def gradient(x, y, y_pred):
    return np.dot(2*x, y_pred - y).mean()

if __name__ == "__main__":
    print(f'Prediction before training: f(5) = {forward(5):.3f}')

    # Training
    learning_rate = 0.01
    n_iters = 20

    for epoch in range(n_iters):
        # predict = forward pass
        y_pred = forward(X)

        # loss
        l = loss(Y, y_pred)

        # calculate gradients
        dw = gradient(X, Y, y_pred)

        # update weights
        w -= learning_rate * dw

        if epoch % 2 == 0:
            print(f'epoch {epoch+1}: w = {w:.3f}, loss = {l:.8f}')

    print(f'Prediction after training: f(5) = {forward(5):.3f}')

# --- checked --------------------------------------------------------------------------------


@case(params={"w": 0.0}, data={"X": X, "Y": Y}, numpy=True, expect={"loss": 30.0, "w": -30.0})
def tutorial(w: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.floating:
    """The tutorial's forward pass and loss: y_pred = w·X, J = mean((y_pred − Y)²)."""
    y_pred = node("y_pred", w * X)  # the tutorial's forward(X), with w passed in, not a global
    return loss(Y, y_pred)


@tutorial.manual
def tutorial_gradient(w: np.ndarray, X: np.ndarray, Y: np.ndarray) -> dict[str, np.floating]:
    y_pred = w * X
    return {"w": gradient(X, Y, y_pred)}  # the tutorial's gradient, as it is


@case(params={"w": 0.0}, data={"X": X, "Y": Y}, numpy=True, expect={"loss": 30.0, "w": -30.0})
def tutorial_fixed(w: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.floating:
    """The same model and loss."""
    y_pred = node("y_pred", w * X)
    return loss(Y, y_pred)


@tutorial_fixed.manual
def tutorial_fixed_gradient(w: np.ndarray, X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    N = len(X)  # 4 samples
    y_pred = w * X  # forward: y_pred = [0, 0, 0, 0] at w = 0
    dJ_dy_pred = 2 * (y_pred - Y) / N  # J = 1/N·Σ(y_pred − y)²: each sample's share, [−1, −2, −3, −4]
    dy_pred_dw = X  # y_pred = w·x
    dJ_dw = np.dot(dJ_dy_pred, dy_pred_dw)  # w is shared by the samples: sum their shares, −30
    return {"w": dJ_dw, "y_pred": dJ_dy_pred}
