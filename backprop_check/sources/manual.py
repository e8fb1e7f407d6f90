"""The manual source: the user's hand-derived chain rule (torch or numpy code; a numpy case's
`.manual` receives numpy arrays, see arrays.py)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from backprop_check.model.arrays import gradient_value
from backprop_check.model.case import Case
from backprop_check.errors import CaseError
from backprop_check.model import complexes
from backprop_check.model.forward import arguments, call_user
from backprop_check.model.function import promoted
from backprop_check.model.points import Point
from backprop_check.sources import Gradients


def gradient(case: Case, point: Point, device: str, dtype: torch.dtype) -> Gradients:
    """Call the case's `.manual` with detached values in `dtype` on `device`."""
    if case.manual_fn is None:
        raise CaseError("the case has no manual gradient")
    at = point.cast(dtype, device)
    with torch.no_grad(), arguments(case, at) as kwargs, promoted(case, dtype):
        returned = call_user(case, "manual gradient", case.manual_fn, kwargs)
    if not isinstance(returned, Mapping):
        raise CaseError(f"the manual gradient must return a dict, got {type(returned).__name__}")
    if case.numpy:
        values = {str(name): gradient_value(name, value) for name, value in returned.items()}
    else:
        values = {str(name): _as_tensor(name, value, device) for name, value in returned.items()}
    for name, value in values.items():
        if name in point.complex and name in point.params:
            # compared as the real view, as the point keeps the parameter (complexes.py)
            values[name] = complexes.gradient_view(name, value)
        elif value.is_complex():
            raise CaseError(
                f"the manual gradient for {name!r} is complex ({str(value.dtype).removeprefix('torch.')}), but "
                f"{name!r} is real, and so is the gradient of a real loss with respect to it (its .real, "
                "once the chain rule through complex intermediates is done)"
            )
    return Gradients("manual", values)


def _as_tensor(name: object, value: Any, device: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        try:
            array = np.asarray(value)
            # complex numbers stay complex: a cast to float64 would keep the real part alone
            tensor = torch.as_tensor(array.astype(np.complex128 if np.iscomplexobj(array) else np.float64))
        except (TypeError, ValueError) as exc:
            raise CaseError(f"manual gradient for {name!r} is not a number or array: {exc}") from None
    if tensor.is_complex():
        return tensor.to(device=device)
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32)):
        raise CaseError(f"manual gradient for {name!r} has dtype {tensor.dtype}")
    return tensor.to(device=device, dtype=torch.float64 if not tensor.is_floating_point() else tensor.dtype)
