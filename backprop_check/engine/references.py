"""Checks against references other than the numerical gradient: the case's published values
(`expect`) and, on another device, autograd on the CPU."""
from __future__ import annotations

import torch

from backprop_check import dtypes
from backprop_check.model.case import Case
from backprop_check.records import MISMATCH, OK, Check, CheckKind, Culprit, complex_label, unravel
from backprop_check.errors import CaseError
from backprop_check.sources import Gradients
from backprop_check.engine.tolerance import ERROR_BARS, Tolerance

# `expect` holds published numbers, often rounded to a few digits.


def expect_checks(
    case: Case,
    numerical: Gradients,
    autograd: Gradients | None,
    dtype: torch.dtype,
    tol,  # noqa: ANN001
    complex_names: frozenset[str] = frozenset(),
) -> list[Check]:
    """The case's published values against the loss and the numerical gradient (`complex_names`:
    the parameters whose values are complex, given as complex numbers)."""
    from backprop_check.model.points import as_float

    checks = []
    rtol = dtypes.row(str(dtype)).expect_rtol
    for name, value in case.expect.items():
        try:
            expected = as_float(name, value, name in complex_names)  # a real number is a complex one
        except CaseError as exc:
            raise CaseError(f"expect= for {name!r}: {exc}") from None
        if name == "loss":
            loss = numerical.loss if autograd is None else autograd.loss  # numpy case: no autograd
            got, bar = loss.to(torch.float64).reshape(1), torch.zeros(1, dtype=torch.float64)
        elif name in numerical.values:
            got, bar = numerical.values[name].reshape(-1), numerical.error[name].reshape(-1)
        else:
            continue
        if expected.numel() != got.numel():
            what = "the loss" if name == "loss" else f"the gradient of {name!r}"
            raise CaseError(f"expect[{name!r}] has {expected.numel()} values, {what} has {got.numel()}")
        expected = expected.reshape(-1)
        allowed = ERROR_BARS * bar + rtol * expected.abs() + tol.allowed(expected, float(expected.abs().max())) + 1e-12
        diff = (got - expected).abs()
        worst = int(torch.argmax(diff / allowed))
        bad = ~(diff <= allowed)
        check = Check(
            name=f"expect {name}",
            kind=CheckKind.EXPECT,
            shape=tuple(numerical.values[name].shape) if name in numerical.values else (),
            verdict=MISMATCH if bool(bad.any()) else OK,
            numerical=float(got[worst]),
            abs_err=float(diff[worst]),
            rel_err=float(diff[worst] / expected[worst].abs()) if float(expected[worst]) else float(diff[worst]),
            allowed=float(allowed[worst]),
            ratio=float(diff[worst] / allowed[worst]),
            bad=int(bad.sum()),
            size=expected.numel(),
        )
        if bad.any():
            shown = name
            if name in complex_names:  # `z[1].imag`, never a bare index of the real view
                shown = complex_label(name, unravel(worst, tuple(numerical.values[name].shape)))
            check.note = f"expected {shown} = {float(expected[worst]):.8g}, the case gives {float(got[worst]):.8g}"
        checks.append(check)
    return checks


def device_checks(
    autograd: Gradients, on_cpu: Gradients, params: list[str], device: str, tol: Tolerance
) -> list[Check]:
    """Cross-device agreement: autograd on `device` against autograd on the CPU."""
    checks = []
    for name in params:
        here = autograd.values[name].detach().to("cpu", torch.float64).reshape(-1)
        there = on_cpu.values[name].detach().to(torch.float64).reshape(-1)
        scale = float(there.abs().max()) if there.numel() else 0.0
        allowed = 2 * tol.allowed(torch.maximum(here.abs(), there.abs()), scale) + torch.finfo(torch.float64).tiny
        diff = (here - there).abs()
        bad = ~(diff <= allowed)
        worst = int(torch.argmax(torch.nan_to_num(diff / allowed, nan=torch.inf))) if diff.numel() else 0
        check = Check(name=f"{name} ({device} vs cpu)", kind=CheckKind.DEVICE, shape=tuple(autograd.values[name].shape),
                      verdict=MISMATCH if bool(bad.any()) else OK, size=diff.numel(), bad=int(bad.sum()))
        if diff.numel():
            check.autograd, check.reference = float(here[worst]), float(there[worst])
            check.abs_err, check.allowed = float(diff[worst]), float(allowed[worst])
            check.ratio = float(diff[worst] / allowed[worst]) if bool(torch.isfinite(diff[worst])) else float("inf")
        if bad.any():
            check.culprit, check.culprits = Culprit.AUTOGRAD, {Culprit.AUTOGRAD: int(bad.sum())}
            check.note = f"autograd on {device} gives {check.autograd:.8g}, on the cpu {check.reference:.8g}"
        checks.append(check)
    return checks
