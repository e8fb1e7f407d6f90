"""Planted bugs in hand-written backward passes of custom `torch.autograd.Function`s.

Here the manual gradient is right and the forward pass calls a custom Function whose
`backward` is wrong, so autograd is the odd one out: finite differences only run the forward
pass and agree with the manual gradient. Every Function sits in the middle of the graph,
z = w ⊙ x, q = f(z), loss = mean((q − y)²), so the gradient flowing into its backward is
2(q − y)/N, not 1 (a backward that ignores grad_output would look right if it were 1).

The last pair has no manual gradient: checked two-way, the float64 finite differences referee
autograd alone, so the wrong backward still makes autograd the culprit.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backprop_check import case, node

EXPECTED = {
    "fn_square_forgot_grad_output": ("mismatch", "autograd"),
    "fn_square_forgot_grad_output_fixed": ("ok", None),
    "fn_sigmoid_sign": ("mismatch", "autograd"),
    "fn_sigmoid_sign_fixed": ("ok", None),
    "fn_cube_factor": ("mismatch", "autograd"),
    "fn_cube_factor_fixed": ("ok", None),
    "fn_softplus_two_way": ("mismatch", "autograd"),
    "fn_softplus_two_way_fixed": ("ok", None),
}

POINT = {
    "params": {"w": [0.5, -1.0, 1.5, 2.0]},
    "data": {"x": [1.0, 2.0, -0.5, 0.25], "y": [0.5, 0.0, 1.0, 0.75]},
}


def through(f: type[torch.autograd.Function], w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """z = w ⊙ x, q = f(z), loss = mean((q − y)²)."""
    z = node("z", w * x)
    q = node("q", f.apply(z))
    return ((q - y) ** 2).mean()


def chain(dq_dz: Tensor, q: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The manual backward pass, given the Function's true local gradient."""
    dloss_dq = 2 * (q - y) / y.numel()
    dloss_dz = dloss_dq * dq_dz
    return {"w": dloss_dz * x, "z": dloss_dz, "q": dloss_dq}


# --- square: the backward forgets to multiply by grad_output --------------------------------------


class SquareForgotGradOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return 2 * z  # BUG: the chain rule needs grad_output · 2z


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad_output * 2 * z


@case(**POINT)
def fn_square_forgot_grad_output(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(SquareForgotGradOutput, w, x, y)


@case(**POINT)
def fn_square_forgot_grad_output_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(Square, w, x, y)


def square_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    z = w * x
    return chain(2 * z, z**2, x, y)


# One manual gradient for both: the Functions' forward passes are the same.
fn_square_forgot_grad_output.manual(square_manual)
fn_square_forgot_grad_output_fixed.manual(square_manual)


# --- sigmoid: the backward's sign is flipped ------------------------------------------------------


class SigmoidWrongSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        return -grad_output * s * (1 - s)  # BUG: σ′ = σ(1 − σ) is positive


class Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (s,) = ctx.saved_tensors
        return grad_output * s * (1 - s)


@case(**POINT)
def fn_sigmoid_sign(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(SigmoidWrongSign, w, x, y)


@case(**POINT)
def fn_sigmoid_sign_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(Sigmoid, w, x, y)


def sigmoid_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    q = torch.sigmoid(w * x)
    return chain(q * (1 - q), q, x, y)


# One manual gradient for both: the Functions' forward passes are the same.
fn_sigmoid_sign.manual(sigmoid_manual)
fn_sigmoid_sign_fixed.manual(sigmoid_manual)


# --- cube (written in the newer setup_context style): the backward has the wrong factor -----------


class CubeWrongFactor(torch.autograd.Function):
    generate_vmap_rule = True  # the newer style: forward without ctx, then setup_context

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return z**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad_output * 2 * z**2  # BUG: d(z³)/dz = 3z²


class Cube(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        return z**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad_output * 3 * z**2


@case(**POINT)
def fn_cube_factor(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(CubeWrongFactor, w, x, y)


@case(**POINT)
def fn_cube_factor_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(Cube, w, x, y)


def cube_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    z = w * x
    return chain(3 * z**2, z**3, x, y)


# One manual gradient for both: the Functions' forward passes are the same.
fn_cube_factor.manual(cube_manual)
fn_cube_factor_fixed.manual(cube_manual)


# --- softplus, checked two-way (no manual gradient): σ(−z) instead of σ(z) ------------------------


class SoftplusWrongSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return torch.nn.functional.softplus(z)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(-z)  # BUG: d softplus(z)/dz = σ(z)


class Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return torch.nn.functional.softplus(z)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(z)


@case(**POINT)
def fn_softplus_two_way(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(SoftplusWrongSign, w, x, y)


@case(**POINT)
def fn_softplus_two_way_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return through(Softplus, w, x, y)
