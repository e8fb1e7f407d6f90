"""The affine model ŷ = w·x + b (exercise 4-2, seed 003).

The linear graph gains one node: the bias b is added after the product. (The exercise's slide
still writes the loss as (x·w − y)²; the loss it means is (ŷ − y)² with the bias inside ŷ.)
Forward at x = 2, y = 4 with w = 1, b = 1:

    ŷ    = w·x + b = 3
    s    = ŷ − y   = −1
    loss = s²      = 1

Local gradients:

    dloss/ds = 2s = −2      ds/dŷ = 1      dŷ/dw = x = 2      dŷ/db = 1

Backward: dloss/dŷ = −2, then both parameters read it off the same node,

    dloss/dw = dloss/dŷ · x = −4        dloss/db = dloss/dŷ · 1 = −2

`affine_mse` fits the tutorial's four samples with a bias, X = [1, 2, 3, 4], Y = 2·X + 1,
from w = b = 0: J = mean(Y²) = 41, dJ/dw = mean(2·x·s) = −35 and dJ/db = mean(2·s) = −12.
"""
from __future__ import annotations

from torch import Tensor

from backprop_check import case, node


@case(
    params={"w": 1.0, "b": 1.0},
    data={"x": 2.0, "y": 4.0},
    expect={"loss": 1.0, "w": -4.0, "b": -2.0},
)
def exercise_4_2(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Exercise 4-2: ŷ = w·x + b, loss = (ŷ − y)²."""
    y_hat = node("y_hat", w * x + b)  # ŷ = 3
    s = node("s", y_hat - y)  # s = −1
    return s**2  # loss = 1


@exercise_4_2.manual
def exercise_4_2_manual(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    y_hat = w * x + b  # forward values
    s = y_hat - y
    dloss_ds = 2 * s  # local gradients: 2s = −2
    ds_dyhat = 1.0
    dyhat_dw = x  # = 2
    dyhat_db = 1.0
    dloss_dyhat = dloss_ds * ds_dyhat  # chain rule: −2
    dloss_dw = dloss_dyhat * dyhat_dw  # −2 · 2 = −4
    dloss_db = dloss_dyhat * dyhat_db  # −2 · 1 = −2
    return {"w": dloss_dw, "b": dloss_db, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(
    params={"w": 0.0, "b": 0.0},
    data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [3.0, 5.0, 7.0, 9.0]},
    expect={"loss": 41.0, "w": -35.0, "b": -12.0},
)
def affine_mse(w: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """ŷ = w·X + b over four samples, J = mean((ŷ − Y)²)."""
    y_hat = node("y_hat", w * X + b)
    s = node("s", y_hat - Y)
    return (s**2).mean()


@affine_mse.manual
def affine_mse_manual(w: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    N = X.numel()
    y_hat = w * X + b  # forward values: ŷ = 0, s = −Y
    s = y_hat - Y
    dloss_ds = 2 * s / N  # [−1.5, −2.5, −3.5, −4.5]
    ds_dyhat = 1.0
    dyhat_dw = X
    dyhat_db = 1.0
    dloss_dyhat = dloss_ds * ds_dyhat
    # Both parameters are shared by the four samples: sum the samples' shares.
    dloss_dw = (dloss_dyhat * dyhat_dw).sum()  # −(1.5 + 5 + 10.5 + 18) = −35
    dloss_db = (dloss_dyhat * dyhat_db).sum()  # −(1.5 + 2.5 + 3.5 + 4.5) = −12
    return {"w": dloss_dw, "b": dloss_db, "y_hat": dloss_dyhat, "s": dloss_ds}
