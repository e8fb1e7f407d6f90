"""The Python API's checks of a function and of a layer pair: `check(fn, inputs)`,
`function_case(...)` for case files, `check_layer(forward, backward, inputs)`. Each builds the
case (model/) and hands it to the runner (engine/); a distributed check's ranks stop with it."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from backprop_check.engine.distributed import DistributedCase
from backprop_check.engine.runner import run
from backprop_check.model.case import register
from backprop_check.model.function import CONTRACT, FunctionCase, Inputs
from backprop_check.model.layers import build_layer
from backprop_check.options import TIMEOUT
from backprop_check.records import Report


def function_case(
    fn: Callable[..., Any] | None = None,
    *,
    inputs: Inputs,
    manual: Callable[..., Any] | None = None,
    name: str | None = None,
    wrt: Iterable[str | int] | None = None,
    rtol: Any = None,
    atol: Any = None,
    sample: Callable[[Any], Mapping[str, Any]] | None = None,
    contract: Iterable[str] = CONTRACT,
    nondet_tol: float = 0.0,
    order: int = 1,
    modes: Sequence[str] = ("rev",),
    world_size: int | None = None,
    placements: Sequence[Any] | None = None,
    out_placements: Sequence[Any] | None = None,
    grad_placements: Sequence[Any] | None = None,
    backend: str | None = None,
    reference: Callable[..., Any] | None = None,
    timeout: float | None = None,
    dtypes: Sequence[str] | None = None,
) -> Any:
    """Turn a function returning tensors into a function check, in a case file like `@case`.

    `inputs` is a tuple in `fn`'s argument order (or a dict name → value, passed by name: fn,
    manual and reference are called with keywords, and manual's gradients are taken in its own
    parameters' order): tensors, callables
    taking a `torch.Generator` and returning a tensor, or constants passed through as they are
    (numbers, None, shapes). `@<check>.manual` (or `manual=`) registers a hand-written VJP
    `manual(grad_outputs, *inputs)`. `reference=` is a plain float64 version of a kernel
    (engine/reference.py), `dtypes=` the dtypes the kernel runs in (e.g. ["bfloat16"]: it is
    checked in those whatever the run's --dtype). The other keywords are `check`'s.
    """

    distributed = dict(
        world_size=world_size, placements=placements, out_placements=out_placements,
        grad_placements=grad_placements, backend=backend, reference=reference, timeout=timeout,
    )

    def build(f: Callable[..., Any]) -> FunctionCase:
        kind, extra = _distributed_kind(distributed, dtypes)
        new = kind(
            f, inputs, name=name, manual=manual, wrt=wrt, rtol=rtol, atol=atol, sample=sample,
            contract=contract, nondet_tol=nondet_tol, order=order, modes=modes, **extra,
        )
        register(new)
        return new

    return build(fn) if fn is not None else build


def check(
    fn: Callable[..., Any],
    inputs: Inputs,
    *,
    manual: Callable[..., Any] | None = None,
    order: int = 1,
    modes: Sequence[str] = ("rev",),
    devices: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    points: int | None = None,
    seed: int = 0,
    name: str | None = None,
    wrt: Iterable[str | int] | None = None,
    rtol: Any = None,
    atol: Any = None,
    sample: Callable[[Any], Mapping[str, Any]] | None = None,
    contract: Iterable[str] = CONTRACT,
    nondet_tol: float = 0.0,
    full: bool = False,
    timeout: float | None = TIMEOUT,
    allow_skip: bool = False,
    world_size: int | None = None,
    placements: Sequence[Any] | None = None,
    out_placements: Sequence[Any] | None = None,
    grad_placements: Sequence[Any] | None = None,
    backend: str | None = None,
    reference: Callable[..., Any] | None = None,
) -> Report:
    """Check `fn(*inputs)`: autograd (and `manual`, a hand-written VJP `manual(grad_outputs,
    *inputs)`) against float64 finite differences of ⟨v, fn⟩ for random cotangents v, at the
    given inputs and at `points` random ones, plus the custom-Function contract. `order=2`
    also checks the derivative of the gradient (double backward, as `gradgradcheck`: with
    respect to the inputs and to grad_output), `order=N` up to the N-th; `modes=("fwd",)`
    checks forward-mode AD (jvp, a custom Function's `jvp`) instead of the backward, both
    with `("rev", "fwd")`.

    `inputs` is a tensor or a tuple (a dict names them, and fn is called with them by name); the floating inputs that require grad
    are differentiated (all floating inputs when none does, or those `wrt` names); other inputs
    are passed through, except a callable, which is called with a seeded `torch.Generator` and
    must return a tensor (pass a function as a constant with `functools.partial` on fn
    instead). Inputs are named by `fn`'s parameter names, else `input0`, `input1`, …
    `devices` defaults to the inputs' devices, `dtypes` to float64 and float32 (every floating
    input is cast to the run's dtype); a device named in `devices` that is missing makes the
    exit code 5, unless `allow_skip`. Bad input is an `error` result with one line. The other
    keywords are `backprop_check.run`'s and `@case`'s.

    `reference=`: a plain function with `fn`'s signature and outputs that runs in float64 on
    the CPU. `fn` (a kernel, in bfloat16, float16 or float32, on any device) is then judged
    against it: its outputs and gradient against the reference's in float64, with a tolerance
    from the reference's own error at `fn`'s dtype, and the reference itself against the
    numerical referee (culprit `reference`). `dtypes` defaults to the inputs' low precision.

    With `world_size=N, placements=..., out_placements=...` (and optionally `grad_placements`,
    `backend`, `reference`), `fn` runs on N ranks of torch.distributed, each with its shards of
    the global `inputs` (engine/distributed.py).
    """
    kind, extra = _distributed_kind(dict(
        world_size=world_size, placements=placements, out_placements=out_placements,
        grad_placements=grad_placements, backend=backend, reference=reference, timeout=timeout,
    ), dtypes if reference is not None else None)
    checked = kind(
        fn, inputs, name=name, manual=manual, wrt=wrt, rtol=rtol, atol=atol, sample=sample,
        contract=contract, nondet_tol=nondet_tol, order=order, modes=modes, **extra,
    )
    try:
        return run(
            checked, devices=devices or checked.devices, dtypes=dtypes, points=points, seed=seed, timeout=timeout, full=full,
            allow_skip=allow_skip,
        )
    finally:
        checked.close()  # a distributed check's ranks stop with it


def _distributed_kind(
    keywords: Mapping[str, Any], kernel_dtypes: Sequence[str] | None
) -> tuple[type[FunctionCase], dict[str, Any]]:
    """FunctionCase (with `reference=` a kernel's float64 reference, engine/reference.py, and
    `kernel_dtypes` the dtypes the kernel runs in), or the distributed check when `world_size=`
    is given (engine/distributed.py), with the keywords it takes."""
    if keywords.get("world_size") is None:
        only_distributed = ("placements", "out_placements", "grad_placements", "backend")
        given = sorted(k for k in only_distributed if keywords.get(k) is not None)
        if given:
            raise TypeError(f"{given[0]}= is for a distributed check: give world_size= too")
        return FunctionCase, {"reference": keywords.get("reference"), "dtypes": kernel_dtypes}
    return DistributedCase, {k: v for k, v in keywords.items() if k != "timeout" or v is not None}


def check_layer(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: Any,
    *,
    name: str | None = None,
    sample: Callable[[Any], Mapping[str, Any]] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    atol: float | Mapping[str, float] | None = None,
    devices: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    points: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Report:
    """Check a layer pair (numpy or torch) with a random `dout` redrawn at every point.

    `forward(*inputs)` returns `(out, cache)`; `backward(dout, cache)` returns the gradients of
    the float inputs in input order (a tuple, or a bare array for a single one). `inputs` is a
    tuple (or one array). The other options are those of `backprop_check.run`."""
    built = build_layer(forward, backward, inputs, name, sample, rtol, atol)
    return run(built, devices=devices, dtypes=dtypes, points=points, seed=seed, **options)
