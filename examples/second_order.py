"""The classic second-order trap, and a wrong jvp: `order=2` and `modes=("rev", "fwd")`.

    backprop-check run examples/second_order.py        # exits 1

`Softplus` is y = log(1 + eˣ), whose derivative is σ(x) = 1/(1 + e⁻ˣ). Its backward is right:
the first-order check agrees. But it computes σ(x) from the saved x *detached*, so autograd
cannot differentiate the backward itself: the gradient of the gradient (a gradient penalty, a
Newton step, a meta-learning update) comes out zero where it should be σ(x)(1 − σ(x)). Only the
check of order 2 sees it: `softplus (order 2)` is a mismatch with culprit autograd and the hint
that the backward records no graph of its own.

Its `jvp` (forward mode) multiplies the tangent by σ(−x), not σ(x): a sign slip that no
backward check can see, since the backward never calls it. `softplus (fwd)` names the input and
output element.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backprop_check import function_case


class Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return torch.nn.functional.softplus(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x.detach())  # the slip: .detach() cuts the second derivative

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.sigmoid(-x) * tangent  # the slip: σ(−x), the derivative of softplus(−x)


@function_case(inputs=(lambda g: torch.randn(6, generator=g, dtype=torch.float64),), order=2, modes=("rev", "fwd"))
def softplus(x: Tensor) -> Tensor:
    return Softplus.apply(x)
