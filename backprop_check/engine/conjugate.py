"""The conjugate slip where an output is complex: a backward that returns v·f′(z) where
torch's convention asks for v·conj(f′(z)).

With a random complex cotangent v the two differ by more than a conjugation (the conjugate of
v·conj(f′) is conj(v)·f′), so the hint's pattern (hints.py, `_conjugate_hint`) cannot see it. With
a real v they are each other's conjugates, for any linear map as for an elementwise f: the
gradient is checked again with the cotangents' imaginary parts set to 0, at up to ELEMENTS of
the wrong tensor's elements, against a fresh finite-difference estimate there.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from backprop_check.engine.tolerance import ERROR_BARS
from backprop_check.model.case import Case
from backprop_check.records import MISMATCH, CheckKind, Culprit, Outcome

# How many elements of the wrong tensor the real-cotangent check estimates anew.
ELEMENTS = 64


def conjugate_hint(case: Case, shown: Outcome, device: str, dtype: torch.dtype, rtol: float) -> str | None:
    """The conjugate hint for a wrong complex gradient of a function with complex outputs, or None."""
    cotangents = [name for name in case.cotangent_names() if name in shown.point.complex and name in shown.point.data]
    if not cotangents:
        return None
    check = next(
        (c for c in shown.checks if c.verdict == MISMATCH and c.kind == CheckKind.PARAM and c.complex
         and c.culprit in (Culprit.MANUAL, Culprit.AUTOGRAD)),
        None,
    )
    if check is None:
        return None
    from backprop_check.sources import SOURCES
    from backprop_check.sources.numerical import FiniteDifferences

    real = {name: shown.point.data[name] * torch.tensor([1.0, 0.0], dtype=torch.float64) for name in cotangents}
    at = replace(shown.point, data={**shown.point.data, **real})
    odd = SOURCES[str(check.culprit)](case, at, device, dtype).values.get(check.name)
    if odd is None:
        return None
    odd = odd.detach().to("cpu", torch.float64).reshape(-1)
    size = odd.numel()
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(0))[:ELEMENTS].sort().values
    estimate = FiniteDifferences(case, at, dtype).estimate([check.name], {check.name: chosen})[check.name]
    truth, error = estimate["value"], estimate["error"]
    odd = odd[chosen]
    # the real view's pairs (re, im): the conjugate flips every second element's sign
    sign = torch.where(chosen % 2 == 1, -1.0, 1.0).to(torch.float64)
    scale = float(truth.abs().max()) if truth.numel() else 0.0
    allowed = ERROR_BARS * error + rtol * (truth.abs() + scale)
    imaginary = (chosen % 2 == 1) & (truth.abs() > allowed)
    if not bool(imaginary.any()):  # a real gradient is its own conjugate: nothing to tell
        return None
    if bool(((odd - truth).abs() <= allowed).all()) or not bool(((odd - sign * truth).abs() <= allowed).all()):
        return None
    what = "manual VJP" if check.culprit == Culprit.MANUAL else "backward"
    return (
        f"with a real grad_output the {check.culprit} dloss/d{check.name} is the complex conjugate of the true one: "
        f"the {what} multiplies grad_output by f′(z) (or by Aᵀ) where torch's convention asks for the conjugate "
        "(grad = grad_output·conj(f′(z)), or Aᴴ·grad_output: the vector-Jacobian product with the conjugate "
        "Jacobian); conjugate the local derivative (.conj(), .mH)"
    )
