"""The one dtype table: every number that depends on the run's dtype, by dtype name.

It imports no torch (the CLI and the pytest plugin validate `--dtype` before torch loads);
engine/tolerance.py turns its rows into `Tolerance` objects.
"""
from __future__ import annotations

from dataclasses import dataclass

from backprop_check.errors import UsageError


@dataclass(frozen=True)
class Row:
    """What one dtype allows."""

    rtol: float  # a source against the float64 reference: rtol·|reference|
    atol: float  # … + atol·(the tensor's largest gradient)
    expect_rtol: float  # published values (`expect=`), often rounded to a few digits
    hint_rtol: float  # how close a ratio must be to a named factor for a hint
    baseline_rtol: float  # a stored baseline value against today's
    baseline_atol: float
    short: str  # its name in the text report's run column


TABLE: dict[str, Row] = {
    "float64": Row(1e-7, 1e-12, 1e-6, 1e-6, 1e-10, 1e-12, "f64"),
    "float32": Row(1e-4, 2e-5, 1e-4, 1e-3, 1e-5, 1e-6, "f32"),
    "float16": Row(5e-3, 1e-3, 1e-3, 2e-2, 1e-2, 1e-3, "f16"),
    "bfloat16": Row(3e-2, 1e-2, 1e-3, 5e-2, 5e-2, 1e-2, "bf16"),
}


def name_of(dtype: object) -> str:
    """A dtype's name as the harness says it, "float32", from `torch.float32` or "float32"."""
    return str(dtype).removeprefix("torch.")


def row(name: object) -> Row:
    """The row of dtype `name` ("float32" or torch.float32); an unknown one reads as float32."""
    return TABLE.get(name_of(name), TABLE["float32"])


def require(name: str) -> None:
    """A usage error unless `name` is a dtype the harness runs in."""
    if name not in TABLE:
        raise UsageError(f"unknown dtype {name!r} (use {', '.join(TABLE)})")
