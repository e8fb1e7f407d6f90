"""What a function check says beyond its three gradients: which output's gradient is wrong
(`output 1 → x`, the gradient of output 1 with respect to input `x`, each output's ⟨v_k, output_k⟩
estimated at the worst element by the three sources), and at the given point the
custom-Function contract (contract.py)."""
from __future__ import annotations

import torch

from backprop_check.engine import contract
from backprop_check.engine.tolerance import ERROR_BARS, Tolerance
from backprop_check.engine.verdict import disagreeing, judged_by, twin_of
from backprop_check.model.function import FunctionCase
from backprop_check.model.points import Point
from backprop_check.records import MISMATCH, Check, CheckKind, Culprit
from backprop_check.sources import SOURCES
from backprop_check.sources.numerical import REFINE_STEPS, FiniteDifferences


def extra_checks(
    case: FunctionCase, point: Point, device: str, dtype: torch.dtype, checks: list[Check], tol: Tolerance
) -> list[Check]:
    """The wrong value checks said as "output k → input", and at the given point the
    custom-Function contract."""
    found = by_output(case, point, device, dtype, checks, tol)
    if point.seed is None and case.contract:
        found.extend(contract.checks(case, point, device, dtype, tol))
    return found


def by_output(case: FunctionCase, point: Point, device: str, dtype: torch.dtype, checks: list[Check], tol: Tolerance) -> list[Check]:
    """For each wrong input, which output's gradient is wrong at its worst element: each
    output's ⟨v_k, output_k⟩ estimated there by the three sources."""
    found = []
    for check in checks:
        if check.kind != CheckKind.PARAM or check.verdict != MISMATCH or check.index is None or check.numerical is None:
            continue
        flat = flat_index(check.index, check.shape)
        # What the whole tensor's tolerance allows beyond the error bar and rtol·|reference|.
        floor = max(0.0, check.allowed - ERROR_BARS * (check.error_bar or 0.0) - tol.rtol * abs(check.numerical))
        if len(case.cotangents) == 1:
            (k,) = case.cotangents
            found.append(_output_check(
                k, check, check.manual, check.numerical, check.error_bar or 0.0, check.autograd, check.allowed, tol, twin=True,
            ))
            continue
        per_output = []
        for k in case.cotangents:
            one = case.for_output(k)
            index = {check.name: torch.tensor([flat])}
            estimate = FiniteDifferences(one, point, dtype).estimate([check.name], index, steps=REFINE_STEPS)[check.name]
            n, e = float(estimate["value"][0]), float(estimate["error"][0])
            a = float(SOURCES["autograd"](one, point, device, dtype).values[check.name].reshape(-1)[flat])
            m = None
            if case.vjp is not None:
                m = float(SOURCES["manual"](one, point, device, dtype).values[check.name].reshape(-1)[flat])
            allowed = ERROR_BARS * e + tol.rtol * abs(n) + floor
            per_output.append(_output_check(k, check, m, n, e, a, allowed, tol))
        wrong = [c for c in per_output if c.ratio > 1] or [max(per_output, key=lambda c: c.ratio)]
        found.extend(wrong)
    return found


def _output_check(
    k: int, check: Check, m: float | None, n: float, e: float, a: float, allowed: float, tol: Tolerance, twin: bool = False
) -> Check:
    """`check` said of output k, from these values (`twin`: `check`'s own, whose float64 twin
    may be what was judged: `check.twin`)."""
    culprit = check.culprit
    odd = {Culprit.MANUAL: m, Culprit.AUTOGRAD: a}.get(culprit) if culprit else None
    if odd is None:
        odd = a if m is None or abs(a - n) >= abs(m - n) else m
    judged = {source: twin_of(check, source) if twin else "" for source in ("manual", "autograd")}
    if any(judged.values()):
        odd = check.twin
    error = abs(odd - n)
    ratio = error / allowed if allowed > 0 else float("inf")
    values = ([f"manual {m:.8g}{judged['manual']}"] if m is not None else []) + [
        f"numerical {n:.8g} ± {e:.2g}", f"autograd {a:.8g}{judged['autograd']}"
    ]
    label = check.label
    note = (
        f"the gradient of output {k} with respect to input `{check.name}` at {label} (Jᵀv for a random "
        f"grad_output v): {', '.join(values)}; error {error:.3g}, {ratio:.3g}× the tolerance {allowed:.3g} "
        f"({judged_by(tol, check.compared)})"
    )
    note += disagreeing(check, f" of `{check.name}`")
    return Check(
        name=f"output {k} → {check.name}",
        kind=CheckKind.OUTPUT,
        shape=check.shape,
        verdict=MISMATCH,
        culprit=culprit,
        manual=m,
        numerical=n,
        autograd=a,
        error_bar=e,
        abs_err=error,
        rel_err=error / abs(n) if n else (float("inf") if error else 0.0),
        allowed=allowed,
        ratio=ratio,
        rounding=check.rounding,
        bad=check.bad,
        size=check.size,
        note=note,
        culprits=dict(check.culprits),
    )


def flat_index(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat
