"""Layer pairs, as courses have students write them: `forward(*inputs) -> (out, cache)` and
`backward(dout, cache) -> gradients`, one per input to differentiate, in input order.

A layer has no loss of its own, so the check gives it one: loss = Σ dout·out, for an upstream
gradient `dout` drawn from a standard normal. dloss/dinput is then exactly what `backward`
computes from `dout`, so backward is the manual gradient, checked against finite differences
(and against autograd, for a torch layer). `dout` is a float datum of the case: it is redrawn
at every random point, and at the given point it is drawn from the seeded generator too,
never all ones (ones would hide a backward that sums where it should not).

Inputs: float numpy arrays (or torch tensors) are differentiated; integer arrays (labels,
indices) are data; anything else (a `conv_param` dict, a mode string) is passed through as it
is. A numpy layer is a numpy case (`numpy=True`): CPU only, manual against numerical.

    check_layer(affine_forward, affine_backward, (x, w, b))       # the Python API: a Report
    affine = layer(affine_forward, affine_backward, (x, w, b))    # in a case file: a Case
"""
from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backprop_check.model.case import Case, register
from backprop_check.errors import CaseError, line_in, one_line

DOUT = "dout"


@dataclass(eq=False)
class LayerCase(Case):
    """A case built from a layer pair; `broken` says why the pair cannot be checked."""

    broken: str | None = None

    def problem(self) -> str | None:
        return self.broken or super().problem()


def layer(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: Any,
    *,
    name: str | None = None,
    sample: Callable[[Any], Mapping[str, Any]] | None = None,
    rtol: float | Mapping[str, float] | None = None,
    atol: float | Mapping[str, float] | None = None,
) -> Case:
    """The layer pair as a `Case`; in a case file it is collected like an `@case` (so the CLI
    and the pytest plugin check it). Its name is `name`, or the forward's without `_forward`."""
    caller = sys._getframe(1)
    built = build_layer(forward, backward, inputs, name, sample, rtol, atol)
    built.file, built.line = caller.f_code.co_filename, caller.f_lineno
    register(built)
    return built


def build_layer(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: Any,
    name: str | None,
    sample: Callable[[Any], Mapping[str, Any]] | None,
    rtol: float | Mapping[str, float] | None,
    atol: float | Mapping[str, float] | None,
) -> LayerCase:
    values = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    names = _names(forward, len(values))
    pair = Pair(forward, backward, names, values)
    code = getattr(forward, "__code__", None)
    built = LayerCase(
        name=name or _default_name(forward),
        forward=pair.loss,
        params={n: v for n, v in zip(names, values) if n in pair.differentiated},
        data={n: v for n, v in zip(names, values) if n in pair.data},
        sample=sample,
        rtol=rtol,
        atol=atol,
        numpy=pair.numpy,
        file=code.co_filename if code else None,
        line=code.co_firstlineno if code else None,
    )
    built.manual_fn = pair.gradients
    built.broken = pair.problem()
    if built.broken is None:
        try:
            shape = pair.out_shape()
        except CaseError as exc:
            built.broken = str(exc)
        else:
            built.data[DOUT] = lambda gen: torch.randn(shape, generator=gen, dtype=torch.float64)
    return built


class Pair:
    """A forward/backward pair seen as a case: the loss Σ dout·out and backward's gradients."""

    def __init__(self, forward: Callable[..., Any], backward: Callable[..., Any], names: list[str], values: tuple[Any, ...]) -> None:
        self.forward, self.backward, self.names, self.values = forward, backward, names, values
        kinds = {n: _kind(v) for n, v in zip(names, values)}
        self.differentiated = [n for n in names if kinds[n][1] == "float"]
        self.data = [n for n in names if kinds[n][1] == "integer"]
        self.constants = {n: v for n, v in zip(names, values) if kinds[n][1] == "constant"}
        libraries = {kinds[n][0] for n in self.differentiated + self.data}
        self.numpy = libraries != {"torch"}
        self.mixed = [n for n in self.differentiated + self.data if kinds[n][0] == "torch"] if len(libraries) > 1 else []

    def problem(self) -> str | None:
        if DOUT in self.names:
            return f"an input is named {DOUT!r}, the name of the upstream gradient: rename it"
        if self.mixed:
            return (
                f"input {self.mixed[0]!r} is a torch tensor and others are numpy arrays: a layer is "
                "checked in numpy or in torch, so give every input the same kind"
            )
        if not self.differentiated:
            return "the layer has no float input to differentiate (give x, w, … as float arrays)"
        return None

    def out_shape(self) -> tuple[int, ...]:
        """The shape of `out` at the given inputs (the shape of `dout`), from a forward on copies
        of them: one that changes its inputs in place (`out = x; out[out < 0] = 0`) would change
        the caller's arrays, the given point among them, and is a broken case."""
        copies = [_snapshot(v) for v in self.values]
        with torch.no_grad():
            out, _ = self._call_forward(copies)
        for name, given, after in zip(self.names, self.values, copies):
            if name not in self.constants and _changed(given, after, name):
                raise CaseError(
                    f"the forward changes {name!r} in place; it must not modify its inputs (compute into a new "
                    "array, e.g. out = np.maximum(x, 0), or copy first)"
                )
        return tuple(out.shape)

    def loss(self, **values: Any) -> Any:
        """The case's forward: Σ dout·out."""
        out, _ = self._call_forward(self._args(values))
        dout = values[DOUT]
        if tuple(out.shape) != tuple(dout.shape):
            raise CaseError(f"forward's out has shape {tuple(out.shape)} at this point, {tuple(dout.shape)} at the given inputs")
        if self.numpy:
            return np.vdot(dout, out)
        return (dout * out).sum()

    def gradients(self, **values: Any) -> dict[str, Any]:
        """The case's manual gradient: backward(dout, cache), after a forward at this point."""
        _, cache = self._call_forward(self._args(values))
        before = _snapshot(cache)
        returned = _call("backward", self.backward, values[DOUT], cache)
        changed = _changed(before, cache, "cache")
        if changed:
            raise CaseError(
                f"backward changes {changed} in place: the cache holds the forward's values, which must "
                "stay as they were (compute into a new array, e.g. dx = dout * (x > 0), or copy first)"
            )
        return dict(zip(self.differentiated, self._per_input(returned)))

    def _per_input(self, returned: Any) -> list[Any]:
        """Backward's gradients, one per differentiated input, or one clear line why not."""
        wanted = self.differentiated
        listed = ", ".join(wanted)
        if not isinstance(returned, (tuple, list)):
            if len(wanted) == 1 and returned is not None:
                return [returned]
            if returned is None:
                raise CaseError(f"backward returned None; it must return the gradient of {listed}")
            raise CaseError(
                f"backward returned one {type(returned).__name__}, but the layer has {len(wanted)} inputs to "
                f"differentiate ({listed}): return their gradients as a tuple, in this order"
            )
        grads = list(returned)
        if len(grads) == len(self.names) and len(self.names) != len(wanted):
            # one entry per input, None for the constants (a conv_param, …): keep the others
            grads = [g for n, g in zip(self.names, grads) if n in wanted or g is not None]
        if len(grads) != len(wanted):
            count = f"backward returned {len(grads)} gradient{'s' if len(grads) != 1 else ''}"
            if len(grads) < len(wanted):
                missing = wanted[len(grads):]
                raise CaseError(
                    f"{count} for {len(wanted)} inputs ({listed}): the gradient of "
                    f"{', '.join(repr(n) for n in missing)} is missing"
                )
            raise CaseError(f"{count}, but the layer has {len(wanted)} inputs to differentiate ({listed}): {len(grads) - len(wanted)} too many")
        for n, g in zip(wanted, grads):
            if g is None:
                raise CaseError(f"backward returned None as the gradient of {n!r}")
        return grads

    def _args(self, values: Mapping[str, Any]) -> list[Any]:
        return [self.constants[n] if n in self.constants else values[n] for n in self.names]

    def _call_forward(self, args: list[Any]) -> tuple[Any, Any]:
        returned = _call("forward", self.forward, *args)
        if not isinstance(returned, tuple) or len(returned) != 2:
            got = f"a tuple of {len(returned)}" if isinstance(returned, tuple) else type(returned).__name__
            raise CaseError(f"a layer's forward must return (out, cache), got {got}")
        out, cache = returned
        if self.numpy and isinstance(out, torch.Tensor):
            raise CaseError("forward's out is a torch tensor in a numpy layer: return numpy arrays (or give torch inputs)")
        if self.numpy and not isinstance(out, np.ndarray):
            out = np.asarray(out)
        if not self.numpy and not isinstance(out, torch.Tensor):
            raise CaseError(f"forward's out is a {type(out).__name__} in a torch layer: return a tensor (or give numpy inputs)")
        return out, cache


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call the user's `fn`; what it raises becomes one line naming the file and line."""
    try:
        return fn(*args)
    except CaseError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise anything
        file = getattr(getattr(fn, "__code__", None), "co_filename", None)
        line = line_in(file, exc)
        at = f" ({Path(file).name}:{line})" if file and line else ""
        raise CaseError(f"{what} raised {one_line(exc)}{at}") from exc


def _kind(value: Any) -> tuple[str, str]:
    """(library, kind) of an input: kind "float" is differentiated, "integer" is a datum."""
    if isinstance(value, torch.Tensor):
        return "torch", "float" if value.is_floating_point() else "integer"
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return "numpy", "float"
        if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
            return "numpy", "integer"
    return "python", "constant"


def _names(forward: Callable[..., Any], count: int) -> list[str]:
    """The forward's parameter names for the inputs; input0, input1, … where it has none."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    names = []
    for i in range(count):
        if i < len(parameters) and parameters[i].kind in (parameters[i].POSITIONAL_ONLY, parameters[i].POSITIONAL_OR_KEYWORD):
            names.append(parameters[i].name)
        else:
            names.append(f"input{i}")
    return names


def _default_name(forward: Callable[..., Any]) -> str:
    name = getattr(forward, "__name__", "") or "layer"
    if name == "<lambda>":
        return "layer"
    return name[: -len("_forward")] if name.endswith("_forward") and len(name) > len("_forward") else name


def _snapshot(value: Any) -> Any:
    """A deep copy of a cache, to tell afterwards whether backward changed it."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return [_snapshot(v) for v in value]  # compared element by element, tuple or list alike
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is not compared
        return _UNCOPIED


_UNCOPIED = object()


def _changed(before: Any, after: Any, path: str) -> str | None:
    """Where `after` differs from the snapshot `before` (`cache[1]`, `cache['x']`), or None."""
    if before is _UNCOPIED:
        return None
    if isinstance(before, np.ndarray):
        same = isinstance(after, np.ndarray) and before.shape == after.shape and _equal(before, after)
        return None if same else f"{path} (an array of shape {before.shape})"
    if isinstance(before, torch.Tensor):
        same = isinstance(after, torch.Tensor) and before.shape == after.shape and bool(
            torch.equal(before, after.detach()) or (before.is_floating_point() and torch.allclose(before, after.detach(), rtol=0, atol=0, equal_nan=True))
        )
        return None if same else f"{path} (a tensor of shape {tuple(before.shape)})"
    if isinstance(before, (tuple, list)):
        if not isinstance(after, (tuple, list)) or len(after) != len(before):
            return path
        for i, (b, a) in enumerate(zip(before, after)):
            found = _changed(b, a, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(before, dict):
        if not isinstance(after, dict) or set(after) != set(before):
            return path
        for key in before:
            found = _changed(before[key], after[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    try:
        return None if bool(before == after) else path
    except Exception:  # noqa: BLE001 - an object without a usable == is not compared
        return None


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))
