"""Newton's method needs the second derivative: the linear model's loss, differentiated twice.

For ŷ = w·x and loss = (ŷ − y)², the first derivative is the chain rule of cases/linear.py,

    dloss/dw = 2·(w·x − y)·x,

and the second differentiates it once more, each factor read off as before:

    d²loss/dw² = d/dw [2·(w·x − y)·x] = 2·x·x

so one Newton step w ← w − (dloss/dw)/(d²loss/dw²) lands on the minimum w = y/x at once. With
several parameters the second derivative is the Hessian H, and what Newton-type methods (and
the harness) use is its product with a direction u: H·u, one gradient's worth of numbers.

`order=2` checks that product three ways: the `.hvp` below (by hand), autograd's double
backward, and float64 finite differences of the first-order gradient. `softplus_regression`
adds a nonlinearity, so the Hessian depends on the point: d²/dz² softplus(z) = σ(z)(1 − σ(z)).
"""
from __future__ import annotations

import torch
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


@case(
    params={"w": [0.5, -0.3, 0.8]},
    data={"X": [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [-0.7, 0.4, 1.1], [1.5, 0.2, -0.6]], "y": [1.0, 0.0, 2.0, -1.0]},
    order=2,
)
def softplus_regression(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """loss = mean(softplus(X·w) − y·(X·w)): a Poisson-like regression, convex in w."""
    z = X @ w
    return (torch.nn.functional.softplus(z) - y * z).mean()


@softplus_regression.manual
def softplus_regression_gradient(w: Tensor, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """dloss/dz = (σ(z) − y)/N, then dz/dw = X: dloss/dw = Xᵀ(σ(z) − y)/N."""
    z = X @ w
    return {"w": X.T @ (torch.sigmoid(z) - y) / len(y)}


@softplus_regression.hvp
def softplus_regression_hvp(u: dict[str, Tensor], w: Tensor, X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """H = Xᵀ·diag(σ(z)(1 − σ(z)))·X/N, so H·u = Xᵀ(s ∘ (X·u))/N with s = σ(z)(1 − σ(z))."""
    s = torch.sigmoid(X @ w)
    return {"w": X.T @ (s * (1 - s) * (X @ u["w"])) / len(y)}
