"""A bfloat16 kernel checked against its plain float64 reference: `reference=`.

    backprop-check run examples/low_precision.py

`RMSNorm` is written as a kernel is: it takes bfloat16 only (float64 is refused, as a Triton
kernel's would be), accumulates in float32 inside, and has a hand-written backward. The float64
referee cannot difference it, so each check names `rms_norm_reference`, the same computation in
plain torch: the harness checks the reference against float64 finite differences, and judges
the kernel's outputs and gradients against the reference's in float64, with a tolerance made of
the reference's own bfloat16 error at the same point (engine/reference.py).

`rms_norm` is right (`ok`). The three others carry the slips kernel backwards are known for,
each a mismatch with culprit `autograd` and the element named:

- `rms_norm_twice_a_term`: a factor 2 on one term of dx;
- `rms_norm_one_element`: one element of dw off by 1.25× (some 60 bfloat16 ulps);
- `rms_norm_half`: a backward that halves the whole gradient.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backprop_check import function_case

EPS = 1e-6
ROWS, WIDTH = 8, 64
SLIPPED = 5  # the element of dw that `rms_norm_one_element` gets wrong


def rms_norm_reference(x: Tensor, w: Tensor) -> Tensor:
    """y = x / rms(x) · w, in plain torch: what the kernel computes, in any dtype."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def rms_norm_kernel(slip: str | None = None) -> type[torch.autograd.Function]:
    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
            if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
                raise TypeError(f"RMSNorm takes bfloat16 tensors, got {x.dtype} and {w.dtype}")
            xf = x.float()  # float32 accumulation inside, as the kernel's registers hold it
            r = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + EPS)
            ctx.save_for_backward(x, w, r)
            return (xf * r * w.float()).to(torch.bfloat16)

        @staticmethod
        def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, Tensor]:
            x, w, r = ctx.saved_tensors
            g, xf = grad_y.float(), x.float()
            x_hat = xf * r  # the normalised input
            dw = (g * x_hat).sum(0)  # y = x̂·w
            dx_hat = g * w.float()
            # x̂ = x·r with r = (mean x² + ε)^(-1/2): dr/dx = −r³·x/n, so
            # dx = r·(dx̂ − x̂·mean(dx̂·x̂))
            projection = (dx_hat * x_hat).mean(-1, keepdim=True)
            if slip == "twice a term":
                projection = 2 * projection  # BUG: a factor 2 on one term of dx
            dx = r * (dx_hat - x_hat * projection)
            if slip == "one element":
                dw[SLIPPED] = dw[SLIPPED] * 1.25  # BUG: one element off by 1.25×
            if slip == "half":
                dx, dw = dx / 2, dw / 2  # BUG: the whole gradient halved
            return dx.to(torch.bfloat16), dw.to(torch.bfloat16)

    return RMSNorm


RMSNorm = rms_norm_kernel()

INPUTS = (
    lambda g: torch.randn(ROWS, WIDTH, generator=g).to(torch.bfloat16),  # x
    lambda g: (1 + 0.5 * torch.randn(WIDTH, generator=g)).to(torch.bfloat16),  # w
)


@function_case(inputs=INPUTS, reference=rms_norm_reference, dtypes=["bfloat16"])
def rms_norm(x: Tensor, w: Tensor) -> Tensor:
    return RMSNorm.apply(x, w)


@function_case(inputs=INPUTS, reference=rms_norm_reference, dtypes=["bfloat16"])
def rms_norm_twice_a_term(x: Tensor, w: Tensor) -> Tensor:
    return rms_norm_kernel("twice a term").apply(x, w)


@function_case(inputs=INPUTS, reference=rms_norm_reference, dtypes=["bfloat16"])
def rms_norm_one_element(x: Tensor, w: Tensor) -> Tensor:
    return rms_norm_kernel("one element").apply(x, w)


@function_case(inputs=INPUTS, reference=rms_norm_reference, dtypes=["bfloat16"])
def rms_norm_half(x: Tensor, w: Tensor) -> Tensor:
    return rms_norm_kernel("half").apply(x, w)
