"""How far apart two gradients may be: the numerical error bar plus the compared dtype's rounding.

Nothing here is a fixed constant that hides bugs: in float64 a gradient off by a relative 1e-6
fails, in float32 one off by 1e-3 fails. The `atol` part scales with the tensor's own largest
gradient (rounding in a sum is relative to its largest terms), so elements near zero in a
tensor of large ones are not false alarms.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import CaseError

# The numerical error bar is an estimate; this many of them is still agreement.
ERROR_BARS = 4.0


@dataclass(frozen=True)
class Tolerance:
    """`rtol`·|reference| + `atol`·(the tensor's largest gradient) + `absolute`."""

    rtol: float
    atol: float
    absolute: float = 0.0

    def allowed(self, reference: torch.Tensor, scale: float) -> torch.Tensor:
        return self.rtol * reference.abs() + self.atol * scale + self.absolute

    def describe(self) -> str:
        parts = [f"rtol {self.rtol:g}"]
        if self.atol:
            parts.append(f"atol {self.atol:g}·max|grad|")
        if self.absolute:
            parts.append(f"atol {self.absolute:g}")
        return ", ".join(parts)


DEFAULTS: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-9),
    torch.float32: Tolerance(rtol=1e-4, atol=2e-5),
    torch.float16: Tolerance(rtol=5e-3, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=3e-2, atol=1e-2),
}


def tolerance_for(dtype: torch.dtype, rtol: object = None, atol: object = None) -> Tolerance:
    """The tolerance for a `dtype` run; a case's `rtol`/`atol` (a number, or a dict keyed by
    dtype name such as "float32") replace the defaults, `atol` then being absolute."""
    default = DEFAULTS.get(dtype, DEFAULTS[torch.float32])
    chosen_rtol = _pick(rtol, dtype)
    chosen_atol = _pick(atol, dtype)
    return Tolerance(
        rtol=default.rtol if chosen_rtol is None else chosen_rtol,
        atol=default.atol if chosen_atol is None else 0.0,
        absolute=0.0 if chosen_atol is None else chosen_atol,
    )


def _pick(value: object, dtype: torch.dtype) -> float | None:
    if isinstance(value, Mapping):
        value = value.get(str(dtype).removeprefix("torch."))
    if value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CaseError(f"rtol= and atol= take a number or a dict by dtype name, got {value!r}") from None
