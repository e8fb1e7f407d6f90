"""numpy cases (`@case(..., numpy=True)`): the user's code sees numpy arrays, the harness tensors.

The harness keeps every value as a torch tensor. At the user's door a numpy case gets
`tensor.numpy()` (a view, no copy: the guards already catch a forward that changes its inputs,
and the manual gradient receives copies of the point), in the run's dtype, integer data staying
integer. What comes back is checked here: the loss must be a number (a Python or numpy float,
or an array holding one value), a gradient a number or a numpy array, and a torch tensor in
either place is a mix-up worth one clear line.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from backprop_check.errors import CaseError

NUMPY_NOTE = (
    "autograd does not apply to a numpy forward: the manual gradient is checked against the "
    "float64 numerical one (with its error bar) alone"
)
NUMPY_ON_CPU = "a numpy=True case runs on the CPU only (numpy arrays live there)"
TORCH_IN_NUMPY = "return numpy values (or drop numpy=True to check torch code)"


def as_arrays(values: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Each tensor as a numpy array in its own dtype."""
    return {name: as_array(name, value) for name, value in values.items()}


def as_array(name: str, tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise CaseError("numpy has no bfloat16: check a numpy=True case in float64, float32 or float16")
    array = tensor.detach().cpu().numpy()
    return array.view(_Jittered) if _DRAWS else array


# The draws of the active `Jittered` (innermost last): (unit, generator).
_DRAWS: list[tuple[float, np.random.Generator]] = []


class Jittered:
    """A dtype's rounding simulated in float64 for numpy code, as `noise._Rounds` simulates it
    for torch ops: while active, the arrays the user's code receives (`as_array`) multiply every
    floating-point value a ufunc computes from them (arithmetic, exp, matmul, the sums of
    np.sum and np.mean) by 1 + δ, δ uniform within ±`unit`, drawn from a generator seeded with
    `seed`: the same draws in the same order for −`unit`. numpy functions that are not ufuncs
    (np.dot, np.where) pass their values on unmoved: a share of the rounding, never more."""

    def __init__(self, unit: float, seed: int) -> None:
        self.draws = (unit, np.random.default_rng(seed))

    def __enter__(self) -> Jittered:
        _DRAWS.append(self.draws)
        return self

    def __exit__(self, *exc: object) -> None:
        _DRAWS.remove(self.draws)


class _Jittered(np.ndarray):
    """An array whose ufunc results are moved by the active `Jittered`'s draws (none outside)."""

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, out: Any = None, **kwargs: Any) -> Any:
        args = [x.view(np.ndarray) if isinstance(x, _Jittered) else x for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, _Jittered) else o for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None or method == "at":  # written in place: moved there
            for o in out or ():
                _move(o.view(np.ndarray) if isinstance(o, np.ndarray) else o)
            return out[0] if out is not None and len(out) == 1 else out
        return tuple(_moved(r) for r in result) if isinstance(result, tuple) else _moved(result)


def _moved(value: Any) -> Any:
    if not _DRAWS:
        return value.view(_Jittered) if isinstance(value, np.ndarray) else value
    if isinstance(value, np.ndarray):
        return _move(value).view(_Jittered)
    if isinstance(value, np.floating):
        unit, gen = _DRAWS[-1]
        return value * type(value)(1 + unit * (2 * gen.random() - 1))
    return value


def _move(array: Any) -> Any:
    if _DRAWS and isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating) and array.size:
        unit, gen = _DRAWS[-1]
        array *= 1 + unit * (2 * gen.random(array.shape) - 1)
    return array


def numpy_loss(loss: Any) -> torch.Tensor:
    """The loss a numpy forward returned, as a 0-d tensor; anything but one real number is a
    broken case."""
    if isinstance(loss, torch.Tensor):
        raise CaseError(f"the forward of a numpy=True case returned a torch tensor: {TORCH_IN_NUMPY}")
    if isinstance(loss, (bool, np.bool_)):
        raise CaseError(f"the forward returned a boolean ({loss}), not the loss")
    if isinstance(loss, (int, float)):
        return torch.tensor(float(loss), dtype=torch.float64)
    if isinstance(loss, (np.ndarray, np.generic)):
        array = np.asarray(loss)
        if array.size != 1:
            raise CaseError(
                f"the forward returned an array of shape {array.shape}, not a number: the loss must be "
                "a scalar (sum or average the per-sample losses, e.g. ((y_pred - y)**2).mean())"
            )
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise CaseError(f"the loss must be a real number, got numpy dtype {array.dtype}")
        if not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float64)
        return torch.from_numpy(array.reshape(()).copy())
    raise CaseError(f"the forward returned {type(loss).__name__}, not a number: return the loss as a float")


def loss_value(loss: Any) -> float:
    """The loss as a float, quickly for the usual number types (the numerical source's loop)."""
    if type(loss) is float or isinstance(loss, np.floating):
        return float(loss)
    return float(numpy_loss(loss))


def node_value(name: str, value: Any) -> torch.Tensor:
    """A node's numpy value as a tensor (a copy: the forward may go on changing its array)."""
    if isinstance(value, torch.Tensor):
        raise CaseError(f"node {name!r} is a torch tensor in a numpy=True case: mark numpy values")
    try:
        array = np.array(value)
    except (TypeError, ValueError) as exc:
        raise CaseError(f"node {name!r} must be a number or a numpy array, got {type(value).__name__}: {exc}") from None
    if not np.issubdtype(array.dtype, np.floating):
        raise CaseError(f"node {name!r} must hold floats, got numpy dtype {array.dtype}")
    return torch.from_numpy(array)


def gradient_value(name: object, value: Any) -> torch.Tensor:
    """A numpy manual gradient as a tensor; a torch tensor there is a mix-up."""
    if isinstance(value, torch.Tensor):
        raise CaseError(f"the manual gradient of a numpy=True case returns a torch tensor for {name!r}: {TORCH_IN_NUMPY}")
    try:
        array = np.array(value)
    except (TypeError, ValueError) as exc:
        raise CaseError(f"manual gradient for {name!r} is not a number or array: {exc}") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise CaseError(f"manual gradient for {name!r} is not a number or array of numbers (numpy dtype {array.dtype})")
    return torch.from_numpy(array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float64))
