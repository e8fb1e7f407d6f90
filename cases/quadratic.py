"""The quadratic model ŷ = w1·x² + w2·x + b (exercises 4-3 and 4-4, seed 003).

Three parameters read the same prediction, each through its own local gradient:

    dŷ/dw1 = x²        dŷ/dw2 = x        dŷ/db = 1

Forward at x = 2, y = 4 with w1 = w2 = b = 1:

    ŷ    = 1·4 + 1·2 + 1 = 7
    s    = ŷ − y         = 3
    loss = s²            = 9

Backward: dloss/dŷ = 2s = 6, then

    dloss/dw1 = 6 · x² = 24        dloss/dw2 = 6 · x = 12        dloss/db = 6 · 1 = 6

Exercise 4-3 asks for these by hand (the manual column), exercise 4-4 with PyTorch (the
autograd column); the harness adds finite differences as the referee. `quadratic_mse` fits
the tutorial's X = [1, 2, 3, 4], Y = 2·X from zero: J = 30, dJ/dw1 = mean(−4x³) = −100,
dJ/dw2 = mean(−4x²) = −30, dJ/db = mean(−4x) = −10.
"""
from __future__ import annotations

from torch import Tensor

from backprop_check import case, node


@case(
    params={"w1": 1.0, "w2": 1.0, "b": 1.0},
    data={"x": 2.0, "y": 4.0},
    expect={"loss": 9.0, "w1": 24.0, "w2": 12.0, "b": 6.0},
)
def exercise_4_3(w1: Tensor, w2: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Exercise 4-3: ŷ = w1·x² + w2·x + b, loss = (ŷ − y)²."""
    y_hat = node("y_hat", w1 * x**2 + w2 * x + b)  # ŷ = 7
    s = node("s", y_hat - y)  # s = 3
    return s**2  # loss = 9


@exercise_4_3.manual
def exercise_4_3_manual(w1: Tensor, w2: Tensor, b: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    y_hat = w1 * x**2 + w2 * x + b  # forward values
    s = y_hat - y
    dloss_ds = 2 * s  # local gradients: 2s = 6
    ds_dyhat = 1.0
    dyhat_dw1 = x**2  # = 4
    dyhat_dw2 = x  # = 2
    dyhat_db = 1.0
    dloss_dyhat = dloss_ds * ds_dyhat  # chain rule: 6
    dloss_dw1 = dloss_dyhat * dyhat_dw1  # 24
    dloss_dw2 = dloss_dyhat * dyhat_dw2  # 12
    dloss_db = dloss_dyhat * dyhat_db  # 6
    return {"w1": dloss_dw1, "w2": dloss_dw2, "b": dloss_db, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(
    params={"w1": 0.0, "w2": 0.0, "b": 0.0},
    data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]},
    expect={"loss": 30.0, "w1": -100.0, "w2": -30.0, "b": -10.0},
)
def quadratic_mse(w1: Tensor, w2: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """ŷ = w1·X² + w2·X + b over four samples, J = mean((ŷ − Y)²)."""
    y_hat = node("y_hat", w1 * X**2 + w2 * X + b)
    s = node("s", y_hat - Y)
    return (s**2).mean()


@quadratic_mse.manual
def quadratic_mse_manual(w1: Tensor, w2: Tensor, b: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    N = X.numel()
    y_hat = w1 * X**2 + w2 * X + b  # forward values: ŷ = 0, s = −Y
    s = y_hat - Y
    dloss_ds = 2 * s / N  # each sample's share of the mean: [−1, −2, −3, −4]
    ds_dyhat = 1.0
    dyhat_dw1 = X**2
    dyhat_dw2 = X
    dyhat_db = 1.0
    dloss_dyhat = dloss_ds * ds_dyhat
    # Every parameter is shared by the four samples: sum the samples' shares.
    dloss_dw1 = (dloss_dyhat * dyhat_dw1).sum()  # −(1 + 8 + 27 + 64) = −100
    dloss_dw2 = (dloss_dyhat * dyhat_dw2).sum()  # −(1 + 4 + 9 + 16) = −30
    dloss_db = (dloss_dyhat * dyhat_db).sum()  # −(1 + 2 + 3 + 4) = −10
    return {"w1": dloss_dw1, "w2": dloss_dw2, "b": dloss_db, "y_hat": dloss_dyhat, "s": dloss_ds}
