"""Complex parameters and the forgotten `.conj()`: torch's convention, checked.

    backprop-check run examples/complex_conj.py          # exit 1: both cases are wrong

For a real loss L of z = x + iy, torch's gradient is dL/dx + i·dL/dy (= 2·∂L/∂z̄). Here
L = Re(conj(c)·z²) = Re f(z) with f holomorphic, f'(z) = 2·conj(c)·z, so by hand

    dL/dx + i·dL/dy = conj(f'(z)) = 2·c·conj(z).

A backward of f must return grad_output·conj(f'(z)): the conjugate is the step people forget.

- `square_backward`: the custom Function `Square` forgets it (grad·2z instead of grad·2·conj(z)),
  and the hand-derived gradient is right: autograd is the culprit, the element named
  (`dloss/dz[0].imag`), and the hint names `Square.backward`.
- `power_manual`: autograd is right and the hand-derived gradient is f'(z) itself, the
  unconjugated derivative: manual is the culprit, and the hint says it is the conjugate of the
  true gradient, naming torch's convention.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backprop_check import case

Z = [0.3 + 1.2j, -0.5 + 0.1j, 1.0 - 0.7j]
C = [1.0 - 2.0j, 0.5 + 0.5j, -0.2 + 1.0j]


class Square(torch.autograd.Function):
    """y = z², with a hand-written backward."""

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad_y * 2 * z  # BUG: grad_y * (2 * z).conj()


@case(params={"z": Z}, data={"c": C})
def square_backward(z: Tensor, c: Tensor) -> Tensor:
    """L = Re(conj(c)·z²), z² through the custom Function."""
    return (c.conj() * Square.apply(z)).real.sum()


@square_backward.manual
def square_backward_manual(z: Tensor, c: Tensor) -> dict[str, Tensor]:
    df_dz = 2 * c.conj() * z  # f(z) = conj(c)·z², holomorphic
    return {"z": df_dz.conj()}  # torch's convention: dL/dx + i·dL/dy = conj(f'(z))


@case(params={"z": Z}, data={"c": C})
def power_manual(z: Tensor, c: Tensor) -> Tensor:
    """The same loss, z² by torch (whose backward is right)."""
    return (c.conj() * z * z).real.sum()


@power_manual.manual
def power_manual_gradient(z: Tensor, c: Tensor) -> dict[str, Tensor]:
    df_dz = 2 * c.conj() * z
    return {"z": df_dz}  # BUG: f'(z) itself; torch's convention needs its conjugate
