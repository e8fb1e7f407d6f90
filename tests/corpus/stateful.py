"""A planted bug that only shows on the second call: a gradient that accumulates across calls.

The seed's training loop warns that `.backward()` accumulates into `w.grad` ("remember set the
grad to ZERO!!!"). This manual gradient mimics that loop: one sample at a time, it adds each
sample's share into a module-level buffer, and never zeroes it. The first call returns the
right gradient; every later call returns the sum of every gradient asked for so far. Its fixed
twin zeroes the buffer first, as `w.grad.data.zero_()` does.

Loss: mean((w·xₙ − yₙ)²) over the seed's SGD data x = [1, 2, 3], y = [2, 4, 6], w = 1.
"""
from __future__ import annotations

from torch import Tensor

from backprop_check import case, node

EXPECTED = {
    "stateful_grad_never_zeroed": ("mismatch", "manual"),
    "stateful_grad_never_zeroed_fixed": ("ok", None),
}

# Cases whose bug can hide at one point per device and dtype: the harness must still catch it
# at the others.
MAY_PASS_ONCE = {
    "stateful_grad_never_zeroed": "the first call finds the buffer empty and returns the right value",
}

SGD_DATA = {"params": {"w": 1.0}, "data": {"x": [1.0, 2.0, 3.0], "y": [2.0, 4.0, 6.0]}}

# Python floats rather than tensors, like the seed's `w.grad.item()`: the buffer outlives the
# call, and so may the dtype and device of whichever call created it.
w_grad = [0.0]
w_grad_fixed = [0.0]


def mean_squared_error(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    y_hat = node("y_hat", w * x)
    return ((y_hat - y) ** 2).mean()


@case(**SGD_DATA)
def stateful_grad_never_zeroed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return mean_squared_error(w, x, y)


@stateful_grad_never_zeroed.manual
def stateful_grad_never_zeroed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, float]:
    N = x.numel()
    # BUG: nothing sets w_grad back to zero, so this call adds to the previous calls' sum
    for x_n, y_n in zip(x.tolist(), y.tolist()):  # one sample at a time, like the seed's loop
        s_n = w.item() * x_n - y_n
        w_grad[0] += 2 * s_n * x_n / N
    return {"w": w_grad[0]}


@case(**SGD_DATA)
def stateful_grad_never_zeroed_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return mean_squared_error(w, x, y)


@stateful_grad_never_zeroed_fixed.manual
def stateful_grad_never_zeroed_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, float]:
    N = x.numel()
    w_grad_fixed[0] = 0.0  # w.grad.data.zero_()
    for x_n, y_n in zip(x.tolist(), y.tolist()):
        s_n = w.item() * x_n - y_n
        w_grad_fixed[0] += 2 * s_n * x_n / N
    return {"w": w_grad_fixed[0]}
