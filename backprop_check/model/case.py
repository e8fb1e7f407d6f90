"""The case-file API: `@case(...)` turns a forward function into a `Case`; `.manual` adds a
hand-derived gradient.

Nothing here raises on a badly written case: a raise at decoration time would take the whole
file down with it. Problems are kept on the case and reported as its `error` verdict instead.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

Tolerance = float | Mapping[str, float] | None

# The loader collects the cases a file defines through this list, in definition order.
_collector: ContextVar[list[Case] | None] = ContextVar("backprop_check_collector", default=None)

@dataclass(eq=False)
class Case:
    """A model to check: a forward pass returning a scalar loss, its parameters and data."""

    name: str
    forward: Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)
    sample: Callable[[Any], Mapping[str, Any]] | None = None
    rtol: Tolerance = None
    atol: Tolerance = None
    module: Callable[[], Any] | None = None
    # numpy=True: the forward and manual receive numpy arrays and return numpy values; autograd
    # does not apply, so the case is checked manual against numerical, on the CPU.
    numpy: bool = False
    manual_fn: Callable[..., Mapping[str, Any]] | None = None
    file: str | None = None
    line: int | None = None
    # order=2 also checks the derivative of the gradient (orders.py); modes= adds forward mode
    # ("fwd": jvp against directional finite differences, jvp.py) to reverse mode ("rev").
    order: int = 1
    modes: tuple[str, ...] = ("rev",)
    hvp_fn: Callable[..., Mapping[str, Any]] | None = None
    # What the checked gradients differentiate, for messages ("dloss/dw"); the derivative of
    # order 2 says "d(∇loss·u)/dw".
    what: str = "loss"
    # Whether finite differences may try to batch the forward with torch.func.vmap.
    batchable: bool = True

    def manual(self, fn: Callable[..., Mapping[str, Any]]) -> Callable[..., Mapping[str, Any]]:
        """Register `fn` as the hand-derived gradient: same arguments, returns name → gradient."""
        self.manual_fn = fn
        return fn

    def hvp(self, fn: Callable[..., Mapping[str, Any]]) -> Callable[..., Mapping[str, Any]]:
        """Register `fn(u, **values)`, a hand-written Hessian-vector product returning name →
        (H·u) for that parameter, where `u` maps every parameter to a direction of its shape:
        the third source of the check of order 2 (needs `order=2`)."""
        self.hvp_fn = fn
        return fn

    def __call__(self, **kwargs: Any) -> Any:
        return self.forward(**kwargs)

    @property
    def level(self) -> int:
        """The order of the derivative this case checks: 1, the gradient (orders.py: more)."""
        return 1

    def prepared(self) -> Case:
        """The case as the engine checks it: what a kind of case learns before its check (a
        function check: its outputs) goes on a copy, so that the case stays as written. A plain
        case is checked as it is."""
        return self

    def close(self) -> None:
        """Release what checking this case held once it is checked (a distributed check's
        ranks); most cases hold nothing."""

    def cotangent_names(self) -> tuple[str, ...]:
        """The data through which the loss is linear (a function check's cotangents): the
        check of the next order differentiates them too."""
        return ()

    def linear_names(self) -> tuple[str, ...]:
        """The parameters whose moves `linear_rows` evaluates in one batched call (none here)."""
        return ()

    def linear_rows(self, at: Any, rows: Mapping[str, Any]) -> Any:
        """The loss at `at` with the tensors in `rows` (linear_names) set to each of their rows."""
        raise NotImplementedError

    def output_names(self) -> tuple[str, ...]:
        return (self.what,)

    @property
    def where(self) -> str:
        """`file:line` of the definition, for messages."""
        if self.file is None:
            return f"<case {self.name}>"
        return f"{self.file}:{self.line}" if self.line else self.file

    def problem(self) -> str | None:
        """Why this case cannot be checked, or None when it is well formed."""
        wrong = requested(self)
        if wrong:
            return wrong
        if self.module is None and not self.params:
            return "the case has no parameters to differentiate (params= is empty)"
        if self.numpy:
            problem = self._numpy_problem()
            if problem:
                return problem
        names = set(self.params) | set(self.data)
        both = sorted(set(self.params) & set(self.data))
        if both:
            return f"{both[0]!r} is given both as a parameter and as a datum"
        if self.expect and not isinstance(self.expect, Mapping):
            return "expect= must be a dict of name → value"
        if self.module is not None:
            names.add("model")
        unknown = sorted(set(self.expect) - set(self.params) - {"loss"})
        if unknown and self.module is None:
            return f"expect names {unknown[0]!r}, which is neither a parameter nor 'loss'"
        return self._arguments_problem(names)

    def _arguments_problem(self, names: set[str]) -> str | None:
        """Why the forward cannot be called with `names` as its keyword arguments, or None."""
        try:
            signature = inspect.signature(self.forward)
        except (TypeError, ValueError):
            return None
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        for arg in signature.parameters.values():
            if arg.kind in (arg.VAR_KEYWORD, arg.VAR_POSITIONAL) or arg.name in names:
                continue
            if arg.default is arg.empty:
                return f"forward argument {arg.name!r} is neither a parameter nor a datum"
        if not accepts_any:
            missing = sorted(names - set(signature.parameters))
            if missing:
                return f"{missing[0]!r} is not an argument of the forward function"
        return None

    def _numpy_problem(self) -> str | None:
        """What a numpy=True case cannot have: a module, torch tensors, no manual gradient."""
        if self.module is not None:
            return "module= builds a torch module, which a numpy=True case cannot run"
        for kind, values in (("parameter", self.params), ("datum", self.data)):
            for name, value in values.items():
                if _is_tensor(value):
                    return (
                        f"{kind} {name!r} is a torch tensor, but the case is numpy=True: give a number "
                        "or a numpy array (or drop numpy=True to check torch code)"
                    )
        if self.manual_fn is None:
            return (
                "a numpy=True case needs a .manual gradient: autograd cannot differentiate numpy "
                "code, so the numerical gradient has nothing to be checked against"
            )
        return None


MODES = ("rev", "fwd")
MAX_ORDER = 4  # each order multiplies the cost; beyond this the check is not worth its time


def requested(case: Case) -> str | None:
    """Why `order=` / `modes=` of `case` cannot be run, or None."""
    order, modes = case.order, case.modes
    if isinstance(order, bool) or not isinstance(order, int):
        return f"order= must be an integer from 1 to {MAX_ORDER}, got {order!r}"
    if not 1 <= order <= MAX_ORDER:
        return f"order={order}: the order must be from 1 (the gradient) to {MAX_ORDER}"
    if not isinstance(modes, tuple) or not modes:
        return f"modes= must be a non-empty tuple of {', '.join(map(repr, MODES))}, got {modes!r}"
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        return f"modes= names {unknown[0]!r}; choose from {', '.join(map(repr, MODES))} (reverse and forward mode)"
    if case.numpy and (order > 1 or "fwd" in modes):
        return (
            "order= above 1 and forward mode need autograd, which does not apply to numpy code: a numpy=True "
            "case is checked at first order in reverse mode"
        )
    if case.hvp_fn is not None and order < 2:
        return "an .hvp (a hand-written Hessian-vector product) is checked at order 2: give order=2"
    return None


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch for this: a tensor implies it is loaded
    return torch is not None and isinstance(value, torch.Tensor)


def case(
    fn: Callable[..., Any] | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    expect: Mapping[str, Any] | None = None,
    sample: Callable[[Any], Mapping[str, Any]] | None = None,
    rtol: Tolerance = None,
    atol: Tolerance = None,
    name: str | None = None,
    module: Callable[[], Any] | None = None,
    numpy: bool = False,
    order: int = 1,
    modes: tuple[str, ...] = ("rev",),
) -> Any:
    """Turn a forward function into a `Case`.

    `params` are differentiated (numbers, nested lists, numpy arrays, tensors, or callables of a
    `torch.Generator`); `data` are constants (float data take the run's dtype, integer data stay
    integer); `expect` holds published values at the given point (param → gradient, "loss" →
    loss); `sample(generator)` returns overrides for random points; `rtol`/`atol` override the
    tolerance (a number, or a dict by dtype name); `module` builds a `torch.nn.Module` whose
    named parameters become the case's parameters and which the forward receives as `model`;
    `numpy=True` hands the forward and the manual gradient numpy arrays in the run's dtype (the
    forward returns the loss as a number) and checks the manual gradient against finite
    differences on the CPU, autograd not applying to numpy code. `order=2` also checks the
    derivative of the gradient (Hessian-vector products: autograd's double backward, and a
    hand-written `.hvp` if given), `order=N` up to the N-th derivative; `modes=("rev", "fwd")`
    also checks forward-mode AD (jvp) against directional finite differences.
    """

    def build(forward: Callable[..., Any]) -> Case:
        code = getattr(forward, "__code__", None)
        new = Case(
            name=name or getattr(forward, "__name__", "case"),
            forward=forward,
            params=dict(params or {}),
            data=dict(data or {}),
            expect=dict(expect or {}) if isinstance(expect, Mapping) or expect is None else expect,
            sample=sample,
            rtol=rtol,
            atol=atol,
            module=module,
            numpy=bool(numpy),
            order=order,
            modes=as_modes(modes),
            file=code.co_filename if code else None,
            line=code.co_firstlineno if code else None,
        )
        register(new)
        return new

    if fn is not None:
        return build(fn)
    return build


def as_modes(modes: Any) -> Any:
    """`modes=` as a tuple: "fwd" alone reads as ("fwd",); anything else is kept for the
    check to reject with one line."""
    if isinstance(modes, str):
        return (modes,)
    return tuple(modes) if isinstance(modes, (tuple, list)) else modes


def register(new: Case) -> None:
    """Hand a newly defined case to the loader, when a case file is being loaded."""
    collected = _collector.get()
    if collected is not None:
        collected.append(new)


def collecting(cases: list[Case]) -> Any:
    """Collect the cases defined while the returned token is set (used by the loader)."""
    return _collector.set(cases)


def stop_collecting(token: Any) -> None:
    _collector.reset(token)

