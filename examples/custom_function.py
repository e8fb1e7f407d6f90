"""Checking a custom `torch.autograd.Function` in a case file: `@function_case`.

    backprop-check run examples/custom_function.py

`ScaledTanh` returns two outputs, y = tanh(x)·s (per column) and the row norms of y; its
backward is written by hand. The function check differentiates ⟨v0, y⟩ + ⟨v1, norms⟩ for random
cotangents v0, v1 (redrawn at every point): a backward that forgets grad_output, which a
`.sum()` loss would hide, is caught, and the report names the output and the input.
`scaled_tanh.manual` adds a hand-written VJP as the third source.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backprop_check import function_case


def scaled_tanh_function(forget_grad_output: bool) -> type[torch.autograd.Function]:
    class ScaledTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
            t = torch.tanh(x)
            y = t * s
            norms = (y * y).sum(1)
            ctx.save_for_backward(t, s, y)
            return y, norms

        @staticmethod
        def backward(ctx: Any, grad_y: Tensor, grad_norms: Tensor) -> tuple[Tensor, Tensor]:
            t, s, y = ctx.saved_tensors
            # dnorms/dy = 2y: the second output flows back through the first
            total = grad_y + (2 * y if forget_grad_output else grad_norms[:, None] * 2 * y)
            dy_dt = s  # y = t·s
            dt_dx = 1 - t * t  # tanh' = 1 − tanh²
            return total * dy_dt * dt_dx, (total * t).sum(0)

    return ScaledTanh


ScaledTanh = scaled_tanh_function(forget_grad_output=False)
ForgotGradOutput = scaled_tanh_function(forget_grad_output=True)  # BUG: grad_norms is dropped

INPUTS = (
    lambda g: torch.randn(5, 3, generator=g, dtype=torch.float64),  # x
    lambda g: torch.randn(3, generator=g, dtype=torch.float64),  # s
)


@function_case(inputs=INPUTS)
def scaled_tanh(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    return ScaledTanh.apply(x, s)


@scaled_tanh.manual
def scaled_tanh_vjp(grad_outputs: tuple[Tensor, Tensor], x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    grad_y, grad_norms = grad_outputs
    t = torch.tanh(x)
    y = t * s
    dloss_dy = grad_y + grad_norms[:, None] * 2 * y
    return dloss_dy * s * (1 - t * t), (dloss_dy * t).sum(0)


@function_case(inputs=INPUTS)
def scaled_tanh_forgot_grad_output(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    return ForgotGradOutput.apply(x, s)
