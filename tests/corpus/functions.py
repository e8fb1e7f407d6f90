"""Planted bugs in custom `torch.autograd.Function`s checked in function mode, each with its
correct twin: one per item of the custom-Function contract, plus a wrong value for one output
and one for one input. Every bug must be found with culprit autograd, and `NAMES` says which
output, input or contract item the report must name; no twin may raise a false alarm, in
float64 or float32.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backprop_check import function_case

EXPECTED: dict[str, tuple[str, str | None]] = {}
# What the failing result must name: ("output", k, input) for a wrong value, ("contract", item).
NAMES: dict[str, tuple[Any, ...]] = {}


def _x(g: torch.Generator) -> Tensor:
    return torch.randn(3, 4, generator=g, dtype=torch.float64)


def _w(g: torch.Generator) -> Tensor:
    return torch.randn(4, generator=g, dtype=torch.float64)


def planted(names: tuple[Any, ...], **options: Any) -> Any:
    """A buggy function check; its twin is the same name with `_fixed`."""

    def wrap(fn: Any) -> Any:
        EXPECTED[fn.__name__] = ("mismatch", "autograd")
        NAMES[fn.__name__] = names
        return function_case(inputs=options.pop("inputs", (_x, _w)), name=fn.__name__, **options)(fn)

    return wrap


def twin(**options: Any) -> Any:
    def wrap(fn: Any) -> Any:
        EXPECTED[fn.__name__] = ("ok", None)
        return function_case(inputs=options.pop("inputs", (_x, _w)), name=fn.__name__, **options)(fn)

    return wrap


# --- a two-output Function: out0 = x·w (broadcast over rows), out1 = tanh(x) --------------------


def scale_tanh(wrong_out1: bool = False, wrong_w: bool = False) -> type[torch.autograd.Function]:
    class ScaleTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
            ctx.save_for_backward(x, w)
            return x * w, torch.tanh(x)

        @staticmethod
        def backward(ctx: Any, g0: Tensor, g1: Tensor) -> tuple[Tensor, Tensor]:
            x, w = ctx.saved_tensors
            dtanh = -(1 - torch.tanh(x) ** 2) if wrong_out1 else 1 - torch.tanh(x) ** 2  # BUG: sign
            dw = (g0 * x).sum(0) * (2 if wrong_w else 1)  # BUG: factor 2
            return g0 * w + g1 * dtanh, dw

    return ScaleTanh


WrongOutput, WrongInput, ScaleTanh = scale_tanh(wrong_out1=True), scale_tanh(wrong_w=True), scale_tanh()


@planted(("output", 1, "x"))
def wrong_value_of_one_output(x: Tensor, w: Tensor) -> Any:
    return WrongOutput.apply(x, w)


@planted(("output", 0, "w"))
def wrong_value_for_one_input(x: Tensor, w: Tensor) -> Any:
    return WrongInput.apply(x, w)


@twin()
def wrong_value_of_one_output_fixed(x: Tensor, w: Tensor) -> Any:
    return ScaleTanh.apply(x, w)


# --- grad_output: the backward ignores it ---------------------------------------------------------


class SquareIgnoresGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x  # BUG: grad · 2x


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * 2 * x


@planted(("contract", "grad_output"), inputs=(_x,))
def ignores_grad_output(x: Tensor) -> Tensor:
    return SquareIgnoresGrad.apply(x)


@twin(inputs=(_x,))
def ignores_grad_output_fixed(x: Tensor) -> Tensor:
    return Square.apply(x)


# --- undefined_grad: set_materialize_grads(False) passes None --------------------------------------


def two_products(handles_none: bool) -> type[torch.autograd.Function]:
    class TwoProducts(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(x, w)
            return x * w, x * x

        @staticmethod
        def backward(ctx: Any, g0: Tensor | None, g1: Tensor | None) -> tuple[Tensor, Tensor | None]:
            x, w = ctx.saved_tensors
            if handles_none:
                dx = torch.zeros_like(x)
                if g0 is not None:
                    dx = dx + g0 * w
                if g1 is not None:
                    dx = dx + g1 * 2 * x
                return dx, None if g0 is None else (g0 * x).sum(0)
            return g0 * w + g1 * 2 * x, (g0 * x).sum(0)  # BUG: g0 or g1 may be None

    return TwoProducts


NoneUnsafe, NoneSafe = two_products(False), two_products(True)


@planted(("contract", "undefined_grad"))
def undefined_grad_unhandled(x: Tensor, w: Tensor) -> Any:
    return NoneUnsafe.apply(x, w)


@twin()
def undefined_grad_unhandled_fixed(x: Tensor, w: Tensor) -> Any:
    return NoneSafe.apply(x, w)


# --- repeatable: the backward depends on how often it ran -------------------------------------------


class Drifting(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.calls = 0
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        ctx.calls += 1
        # BUG: a stand-in for an accumulation order that changes between runs, far below any rtol
        return grad * 2 * x * (1 + torch.finfo(x.dtype).eps * (ctx.calls - 1))


@planted(("contract", "repeatable"), inputs=(_x,))
def backward_not_repeatable(x: Tensor) -> Tensor:
    return Drifting.apply(x)


@twin(inputs=(_x,))
def backward_not_repeatable_fixed(x: Tensor) -> Tensor:
    return Square.apply(x)


# --- grad_meta: wrong dtype, wrong (broadcastable) shape --------------------------------------------


class HalfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad * 2 * x).to(torch.bfloat16)  # BUG: autograd casts it back silently


class RowShapedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * w

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        (x,) = ctx.saved_tensors
        return None, (grad * x).sum(0, keepdim=True)  # BUG: shape (1, 4) for w of shape (4,)


class Rowwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * w

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        (x,) = ctx.saved_tensors
        return None, (grad * x).sum(0)


@planted(("contract", "grad_meta"), inputs=(_x,))
def gradient_of_wrong_dtype(x: Tensor) -> Tensor:
    return HalfGrad.apply(x)


@twin(inputs=(_x,))
def gradient_of_wrong_dtype_fixed(x: Tensor) -> Tensor:
    return Square.apply(x)


@planted(("contract", "grad_meta"), wrt=("w",))
def gradient_of_wrong_shape(x: Tensor, w: Tensor) -> Tensor:
    return RowShapedGrad.apply(x, w)


@twin(wrt=("w",))
def gradient_of_wrong_shape_fixed(x: Tensor, w: Tensor) -> Tensor:
    return Rowwise.apply(x, w)


# --- layout: a kernel that assumes contiguous memory -------------------------------------------------


def flat_square(assumes_contiguous: bool) -> type[torch.autograd.Function]:
    class FlatSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            ctx.save_for_backward(x)
            # BUG: reads the storage as if it were contiguous (what a C++/CUDA kernel does)
            flat = torch.as_strided(x, (x.numel(),), (1,)) if assumes_contiguous else x.reshape(-1)
            return (flat * flat).reshape(x.shape)

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> Tensor:
            (x,) = ctx.saved_tensors
            return grad * 2 * x

    return FlatSquare


ContiguousOnly, AnyLayout = flat_square(True), flat_square(False)


@planted(("contract", "layout"), inputs=(_x,))
def assumes_contiguous_input(x: Tensor) -> Tensor:
    return ContiguousOnly.apply(x)


@twin(inputs=(_x,))
def assumes_contiguous_input_fixed(x: Tensor) -> Tensor:
    return AnyLayout.apply(x)


# --- vmap: a hand-written vmap rule that mixes the batch into the data --------------------------------


def normalized(wrong_rule: bool) -> type[torch.autograd.Function]:
    class Normalized(torch.autograd.Function):
        """y = x / Σx², with setup_context and a hand-written vmap rule."""

        @staticmethod
        def forward(x: Tensor) -> Tensor:
            return x / (x * x).sum()

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> Tensor:
            (x,) = ctx.saved_tensors
            s = (x * x).sum()
            return grad / s - 2 * x * (grad * x).sum() / s**2

        @staticmethod
        def vmap(info: Any, in_dims: tuple[int | None], x: Tensor) -> tuple[Tensor, int]:
            x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(info.batch_size, *x.shape)
            if wrong_rule:
                return x / (x * x).sum(), 0  # BUG: sums over the batch too
            dims = tuple(range(1, x.dim()))
            return x / (x * x).sum(dim=dims, keepdim=True), 0

    return Normalized


WrongRule, RightRule = normalized(True), normalized(False)


@planted(("contract", "vmap"), inputs=(_w,))
def wrong_vmap_rule(w: Tensor) -> Tensor:
    return WrongRule.apply(w)


@twin(inputs=(_w,))
def wrong_vmap_rule_fixed(w: Tensor) -> Tensor:
    return RightRule.apply(w)


# --- in_place: the backward scales grad_output in place --------------------------------------------


class ScalesGradInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad.mul_(2) * x  # BUG: changes the caller's grad_output


@planted(("contract", "in_place"), inputs=(_x,))
def modifies_grad_output(x: Tensor) -> Tensor:
    return ScalesGradInPlace.apply(x)


@twin(inputs=(_x,))
def modifies_grad_output_fixed(x: Tensor) -> Tensor:
    return Square.apply(x)
