"""A two-layer network ŷ = W2(W1·X + b1) + b2 with W1 6×5 (seed 003), in matrix calculus.

One sample per column, as in the seed's h = W·x with x ∈ R⁵ and h ∈ R⁶:

    X   5×4   four samples of five features (the first feature is the tutorial's [1, 2, 3, 4])
    W1  6×5,  b1 6×1    h = W1·X + b1      6×4
    W2  1×6,  b2 1×1    ŷ = W2·h + b2      1×4
    loss = mean((ŷ − Y)²) over the N = 4 samples

Backward, one matrix product per step. Each gradient has the shape of what it is the gradient
of, which says on which side a local gradient multiplies and when to transpose:

    dloss/dŷ  = 2(ŷ − Y)/N           1×4
    dloss/dW2 = dloss/dŷ · hᵀ        1×6    (dŷ/dW2 = hᵀ, multiplied on the right)
    dloss/db2 = Σₙ dloss/dŷ          1×1    (b2 is added to every column: sum the columns)
    dloss/dh  = W2ᵀ · dloss/dŷ       6×4    (dŷ/dh = W2ᵀ, multiplied on the left)
    dloss/dW1 = dloss/dh · Xᵀ        6×5
    dloss/db1 = Σₙ dloss/dh          6×1

The seed's warning: without a nonlinearity the two layers collapse into one,
ŷ = (W2·W1)·X + (W2·b1 + b2), so `two_layer_sigmoid` puts a = σ(h) between them. Its backward
gains a single line, dloss/dh = dloss/da ⊙ σ(h)(1 − σ(h)), with dloss/da = W2ᵀ · dloss/dŷ.

The weights start random (drawn from the harness's seeded generator, scaled by 1/√fan-in so h
stays near unit size) and the biases at zero, so there are no published values to expect:
the three gradient sources check each other.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from backprop_check import case, node


def _weight(rows: int, cols: int) -> Callable[[torch.Generator], Tensor]:
    """A random initial weight matrix, scaled by 1/√cols (its fan-in)."""
    return lambda g: torch.randn(rows, cols, generator=g, dtype=torch.float64) / cols**0.5


PARAMS = {
    "W1": _weight(6, 5),
    "b1": torch.zeros(6, 1, dtype=torch.float64),
    "W2": _weight(1, 6),
    "b2": torch.zeros(1, 1, dtype=torch.float64),
}
DATA = {
    "X": [
        [1.0, 2.0, 3.0, 4.0],
        [0.5, -1.0, 0.0, 1.5],
        [-0.5, 0.0, 1.0, -1.0],
        [2.0, 1.0, -1.5, 0.5],
        [0.0, -0.5, 0.5, -2.0],
    ],
    "Y": [[2.0, 4.0, 6.0, 8.0]],
}


@case(params=PARAMS, data=DATA)
def two_layer_linear(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """ŷ = W2(W1·X + b1) + b2, loss = mean((ŷ − Y)²)."""
    h = node("h", W1 @ X + b1)
    y_hat = node("y_hat", W2 @ h + b2)
    return ((y_hat - Y) ** 2).mean()


@two_layer_linear.manual
def two_layer_linear_manual(
    W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, X: Tensor, Y: Tensor
) -> dict[str, Tensor]:
    N = Y.numel()
    h = W1 @ X + b1  # forward values
    y_hat = W2 @ h + b2
    dloss_dyhat = 2 * (y_hat - Y) / N  # local gradients, as the matrices the chain multiplies by
    dyhat_dW2 = h.T  # ŷ = W2·h: right-multiply by hᵀ
    dyhat_dh = W2.T  # left-multiply by W2ᵀ
    dh_dW1 = X.T  # h = W1·X: right-multiply by Xᵀ
    dloss_dW2 = dloss_dyhat @ dyhat_dW2  # chain rule, loss back to the parameters: 1×6
    dloss_db2 = dloss_dyhat.sum(dim=1, keepdim=True)  # 1×1
    dloss_dh = dyhat_dh @ dloss_dyhat  # 6×4
    dloss_dW1 = dloss_dh @ dh_dW1  # 6×5
    dloss_db1 = dloss_dh.sum(dim=1, keepdim=True)  # 6×1
    return {
        "W1": dloss_dW1,
        "b1": dloss_db1,
        "W2": dloss_dW2,
        "b2": dloss_db2,
        "h": dloss_dh,
        "y_hat": dloss_dyhat,
    }


@case(params=PARAMS, data=DATA)
def two_layer_sigmoid(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """ŷ = W2·σ(W1·X + b1) + b2, loss = mean((ŷ − Y)²)."""
    h = node("h", W1 @ X + b1)
    a = node("a", torch.sigmoid(h))
    y_hat = node("y_hat", W2 @ a + b2)
    return ((y_hat - Y) ** 2).mean()


@two_layer_sigmoid.manual
def two_layer_sigmoid_manual(
    W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, X: Tensor, Y: Tensor
) -> dict[str, Tensor]:
    N = Y.numel()
    h = W1 @ X + b1  # forward values
    a = torch.sigmoid(h)
    y_hat = W2 @ a + b2
    dloss_dyhat = 2 * (y_hat - Y) / N  # local gradients
    dyhat_dW2 = a.T
    dyhat_da = W2.T
    da_dh = a * (1 - a)  # σ'(h) = σ(h)(1 − σ(h)), elementwise
    dh_dW1 = X.T
    dloss_dW2 = dloss_dyhat @ dyhat_dW2  # chain rule, loss back to the parameters: 1×6
    dloss_db2 = dloss_dyhat.sum(dim=1, keepdim=True)  # 1×1
    dloss_da = dyhat_da @ dloss_dyhat  # 6×4
    dloss_dh = dloss_da * da_dh  # 6×4, elementwise: σ acts on each entry alone
    dloss_dW1 = dloss_dh @ dh_dW1  # 6×5
    dloss_db1 = dloss_dh.sum(dim=1, keepdim=True)  # 6×1
    return {
        "W1": dloss_dW1,
        "b1": dloss_db1,
        "W2": dloss_dW2,
        "b2": dloss_db2,
        "h": dloss_dh,
        "a": dloss_da,
        "y_hat": dloss_dyhat,
    }
