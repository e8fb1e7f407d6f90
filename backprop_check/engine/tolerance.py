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

from backprop_check import dtypes
from backprop_check.dtypes import name_of
from backprop_check.errors import CaseError

# The numerical error bar is an estimate; this many of them is still agreement.
ERROR_BARS = 4.0
# Two exact computations of one gradient (manual, autograd) differ by rounding of the sums
# they make: this many ulps of the dtype, times the point's largest gradient, is agreement.
# It is what keeps a gradient that is exactly zero (a bias cancelled by batch normalization:
# 1e-18 against 3e-19) from a false alarm.
FLOOR_ULPS = 64.0
# A random-sign sum of n independent roundings grows like √n: this many times its root-mean-
# square bound is agreement for a directional derivative.
SIGMAS = 4.0


@dataclass(frozen=True)
class Tolerance:
    """`rtol`·|reference| + `atol`·(the tensor's largest gradient) + `absolute`."""

    rtol: float
    atol: float
    absolute: float = 0.0
    eps: float = torch.finfo(torch.float64).eps  # the run dtype's machine epsilon
    rtol_given: float = 0.0  # the rtol a case sets (0 for the dtype's default)
    # Below float64: the tolerance of the sources' float64 twins at the same point.
    twin: Tolerance | None = None
    # The run dtype's smallest normal number: a gradient below it underflows in that dtype
    # (prod of 125 float32 numbers: 2e-56 is 0 in float32), so no difference below it is a finding.
    underflow: float = 0.0

    def allowed(self, reference: torch.Tensor, scale: float) -> torch.Tensor:
        """(a tensor, or a numpy array: the same arithmetic)"""
        return self.rtol * abs(reference) + self.atol * scale + self.absolute + self.underflow

    def between(
        self, first: torch.Tensor, second: torch.Tensor, rounding: torch.Tensor, largest: float
    ) -> torch.Tensor:
        """How far two exact gradients (manual and autograd) may differ at each element: the
        rtol of both, their rounding allowances at this point, and the floor of FLOOR_ULPS
        ulps of the point's `largest` gradient. No atol scaled by the tensor: a wrong element
        a thousand times smaller than its neighbours still fails."""
        both = torch.maximum(first.abs(), second.abs())
        return 2 * self.rtol * both + rounding + self.floor(largest) + self.absolute + self.underflow

    def floor(self, largest: float) -> float:
        return FLOOR_ULPS * self.eps * largest

    def along(
        self, gradient: torch.Tensor, vector: torch.Tensor, rounding: torch.Tensor | None, exact: bool = False
    ) -> float:
        """How far a source's derivative along `vector` may be off by its own rounding: the
        per-element allowances (measured at this point below float64, else FLOOR_ULPS ulps of
        each element) projected on random signs add like √n, not like n. The dtype's default
        rtol is left out (√n of it would hide a wrong element of a large tensor); an rtol the
        case sets is kept, and so is the dtype's underflow (each element of a float32 gradient
        of 1e-50 is 0). `exact`: a float64 twin of the gradient, judged by float64's eps."""
        ulps = FLOOR_ULPS if rounding is None else 4.0
        eps = torch.finfo(torch.float64).eps if exact else self.eps
        per_element = (ulps * eps + self.rtol_given) * gradient.abs() + self.absolute + (0.0 if exact else self.underflow)
        if rounding is not None:
            per_element = per_element + rounding
        return SIGMAS * float(torch.linalg.vector_norm(per_element * vector))

    def describe(self) -> str:
        parts = [f"rtol {self.rtol:g}"]
        if self.atol:
            parts.append(f"atol {self.atol:g}·max|grad|")
        if self.absolute:
            parts.append(f"atol {self.absolute:g}")
        return ", ".join(parts)


DEFAULTS: dict[torch.dtype, Tolerance] = {
    getattr(torch, name): Tolerance(rtol=r.rtol, atol=r.atol) for name, r in dtypes.TABLE.items()
}


def tolerance_for(dtype: torch.dtype, rtol: object = None, atol: object = None) -> Tolerance:
    """The tolerance for a `dtype` run; a case's `rtol`/`atol` (a number, or a dict keyed by
    dtype name such as "float32") replace the defaults, `atol` then being absolute."""
    default = DEFAULTS.get(dtype, DEFAULTS[torch.float32])
    chosen_rtol = _pick(rtol, dtype)
    chosen_atol = _pick(atol, dtype)
    return Tolerance(
        twin=None if dtype == torch.float64 else tolerance_for(torch.float64, rtol, atol),
        rtol=default.rtol if chosen_rtol is None else chosen_rtol,
        atol=default.atol if chosen_atol is None else 0.0,
        absolute=0.0 if chosen_atol is None else chosen_atol,
        eps=torch.finfo(dtype).eps,
        rtol_given=0.0 if chosen_rtol is None else chosen_rtol,
        underflow=torch.finfo(dtype).tiny,
    )


def _pick(value: object, dtype: torch.dtype) -> float | None:
    if isinstance(value, Mapping):
        unknown = sorted(str(key) for key in value if name_of(key) not in dtypes.TABLE)
        if unknown:  # a typo ("fp32") would leave the case's own tolerance unused without a word
            raise CaseError(f"rtol= and atol= by dtype name: {unknown[0]!r} is no dtype (use {', '.join(dtypes.TABLE)})")
        value = {name_of(key): v for key, v in value.items()}.get(name_of(dtype))
    if value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CaseError(f"rtol= and atol= take a number or a dict by dtype name, got {value!r}") from None
