"""A Hessian-vector product by hand for a nonlinear model: softplus regression, `order=2`.

    backprop-check run examples/newton.py

loss = mean(softplus(X·w) − y·(X·w)), convex in w (a Poisson-like regression). With z = X·w:

    dloss/dz  = (σ(z) − y)/N                  dloss/dw = Xᵀ·dloss/dz
    d²loss/dz² = σ(z)(1 − σ(z))/N             H = Xᵀ·diag(σ(z)(1 − σ(z)))·X/N

so H·u = Xᵀ(s ∘ (X·u))/N with s = σ(z)(1 − σ(z)): one gradient's worth of work, never the N×N
matrix. Newton's method solves H·Δ = −∇loss with such products (conjugate gradients). The
harness checks `.hvp` against autograd's double backward and float64 finite differences of the
gradient, at the given point and at random ones (where the Hessian differs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from backprop_check import case


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
