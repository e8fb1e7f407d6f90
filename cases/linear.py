"""The linear model ŷ = w·x: the chain rule's first lesson (seeds 000 and 003).

The computational graph has three nodes. Forward, for the tutorial's sample x = 1, y = 2 and
its initial weight w = 1:

    ŷ    = w·x    =  1
    s    = ŷ − y  = −1
    loss = s²     =  1

Local gradients, each read off its own node alone:

    dloss/ds = 2s = −2        ds/dŷ = 1        dŷ/dw = x = 1

Backward, multiplying them from the loss back to the weight:

    dloss/dŷ = dloss/ds · ds/dŷ = −2 · 1 = −2
    dloss/dw = dloss/dŷ · dŷ/dw = −2 · 1 = −2

At x = 1 the last factor is 1, so a derivation that forgets dŷ/dw = x still finds −2; that is
why the harness checks every case at random points too. Exercise 4-1 walks the same graph at
x = 2, y = 4 and finds −8. `linear_mse` averages the loss over the gradient-descent
tutorial's data (seed 001), X = [1, 2, 3, 4], Y = 2·X, where at w = 0 the mean squared error is
30 and its gradient dJ/dw = mean(2·x·(w·x − y)) = −30.
"""
from __future__ import annotations

from torch import Tensor

from backprop_check import case, node


@case(params={"w": 1.0}, data={"x": 1.0, "y": 2.0}, expect={"loss": 1.0, "w": -2.0})
def linear(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """ŷ = w·x, loss = (ŷ − y)²."""
    y_hat = node("y_hat", w * x)
    s = node("s", y_hat - y)
    return s**2


@linear.manual
def linear_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    y_hat = w * x  # forward values: ŷ = 1, s = −1
    s = y_hat - y
    dloss_ds = 2 * s  # local gradients: d(s²)/ds = 2s = −2
    ds_dyhat = 1.0  # d(ŷ − y)/dŷ = 1
    dyhat_dw = x  # d(w·x)/dw = x = 1
    dloss_dyhat = dloss_ds * ds_dyhat  # chain rule, loss back to w: −2
    dloss_dw = dloss_dyhat * dyhat_dw  # −2
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(params={"w": 1.0}, data={"x": 2.0, "y": 4.0}, expect={"loss": 4.0, "w": -8.0})
def exercise_4_1(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Exercise 4-1: the same graph at x = 2, y = 4, w = 1."""
    y_hat = node("y_hat", w * x)  # ŷ = 2
    s = node("s", y_hat - y)  # the exercise calls this residual r: r = −2
    return s**2  # loss = 4


@exercise_4_1.manual
def exercise_4_1_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    y_hat = w * x
    s = y_hat - y
    dloss_ds = 2 * s  # dloss/dr = 2r = −4
    ds_dyhat = 1.0  # dr/dŷ = 1
    dyhat_dw = x  # dŷ/dw = x = 2
    dloss_dyhat = dloss_ds * ds_dyhat  # dloss/dŷ = −4 · 1 = −4
    dloss_dw = dloss_dyhat * dyhat_dw  # dloss/dw = −4 · 2 = −8
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(
    params={"w": 0.0},
    data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]},
    expect={"loss": 30.0, "w": -30.0},
)
def linear_mse(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """ŷ = w·X over four samples, J = mean((ŷ − Y)²)."""
    y_hat = node("y_hat", w * X)
    s = node("s", y_hat - Y)
    return (s**2).mean()


@linear_mse.manual
def linear_mse_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    N = X.numel()  # 4 samples
    y_hat = w * X  # forward values: ŷ = [0, 0, 0, 0], s = −Y
    s = y_hat - Y
    dloss_ds = 2 * s / N  # J = (1/N)·Σ sₙ², so each sₙ gets 2sₙ/N = [−1, −2, −3, −4]
    ds_dyhat = 1.0
    dyhat_dw = X
    dloss_dyhat = dloss_ds * ds_dyhat
    # w is shared by all four samples: its gradient is the sum of their shares,
    # Σ −[1, 4, 9, 16] = −30, which is mean(2·x·(w·x − y)).
    dloss_dw = (dloss_dyhat * dyhat_dw).sum()
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}
