"""Stochastic gradient descent on the linear model, one sample at a time (seed 003).

The seed trains ŷ = x·w on three samples, x = [1, 2, 3], y = [2, 4, 6], from w = 1 with
learning rate 0.01, updating w after each sample:

    w ← w − 0.01 · dloss/dw,    dloss/dw = 2·x·(x·w − y)

and publishes the float32 run: grads −2.0, −7.84, −16.2288017 in the first epoch, epoch losses
7.3159437, 3.9987640, 2.1856532, …, and predict(4) = 7.9999986 after 100 epochs. Replay it,
checking the three gradients at every step:

    backprop-check trace cases/sgd_trace.py --epochs 100 --lr 0.01 --per-sample --predict 4

Each step sees one sample (x and y scalars); checked as a whole (`backprop-check run`), the loss
is the sum over the three samples: Σ (x·w − y)² = 1 + 4 + 9 = 14 and dloss/dw = Σ 2x(x·w − y)
= −2 − 8 − 18 = −28 at w = 1.
"""
from __future__ import annotations

from torch import Tensor

from backprop_check import case, node


@case(params={"w": 1.0}, data={"x": [1.0, 2.0, 3.0], "y": [2.0, 4.0, 6.0]}, expect={"loss": 14.0, "w": -28.0})
def linear_sgd(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """ŷ = x·w, loss = Σ (ŷ − y)² (a single sample's squared error when x, y are scalars)."""
    y_hat = node("y_hat", w * x)
    s = node("s", y_hat - y)
    return (s**2).sum()


@linear_sgd.manual
def linear_sgd_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    y_hat = w * x  # forward values; for the first sample ŷ = 1, s = −1
    s = y_hat - y
    dloss_ds = 2 * s  # local gradients: d(s²)/ds = 2s
    ds_dyhat = 1.0  # d(ŷ − y)/dŷ = 1
    dyhat_dw = x  # d(x·w)/dw = x
    dloss_dyhat = dloss_ds * ds_dyhat  # chain rule, loss back to w
    dloss_dw = (dloss_dyhat * dyhat_dw).sum()  # w is shared by the samples: sum their shares
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}
