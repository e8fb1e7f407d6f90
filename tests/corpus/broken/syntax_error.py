"""A case file that cannot be imported: a closing parenthesis is missing.

The harness reports one error naming this file and the line, and the other files still run.
There is no EXPECTED here: a file that does not parse cannot say what it expects.
"""
from __future__ import annotations

from torch import Tensor

from backprop_check import case, node


@case(params={"w": 1.0}, data={"x": 1.0, "y": 2.0})
def broken_syntax(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    y_hat = node("y_hat", w * x
    return (y_hat - y) ** 2
