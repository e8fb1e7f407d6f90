"""Newton's method needs the second derivative: the linear model's loss, differentiated twice.

For ŷ = w·x and loss = (ŷ − y)², the first derivative is the chain rule of cases/linear.py,

    dloss/dw = 2·(w·x − y)·x,

and the second differentiates it once more, each factor read off as before:

    d²loss/dw² = d/dw [2·(w·x − y)·x] = 2·x·x

so one Newton step w ← w − (dloss/dw)/(d²loss/dw²) lands on the minimum w = y/x at once. With
several parameters the second derivative is the Hessian H, and what Newton-type methods (and
the harness) use is its product with a direction u: H·u, one gradient's worth of numbers.

`order=2` checks that product three ways: the `.hvp` below (by hand), autograd's double
backward, and float64 finite differences of the first-order gradient. examples/newton.py adds
a nonlinearity, so that the Hessian depends on the point.
"""
from __future__ import annotations

from torch import Tensor

from backprop_check import case


@case(params={"w": 1.0}, data={"x": 2.0, "y": 4.0}, order=2)
def linear_newton(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """loss = (w·x − y)²: a constant second derivative 2x²."""
    return (w * x - y) ** 2


@linear_newton.manual
def linear_newton_gradient(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    return {"w": 2 * (w * x - y) * x}


@linear_newton.hvp
def linear_newton_hvp(u: dict[str, Tensor], w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """H·u with H = d²loss/dw² = 2·x·x (w is a scalar, so H is a number)."""
    return {"w": 2 * x * x * u["w"]}
