"""What the two exact sources say of one tensor, lined up: autograd's and manual's gradients
(flat, float64) with their rounding allowances and float64 twins, the manual gradient checked
against the reference's shape, and where the two disagree with each other.

Manual and autograd are whole tensors, so they are compared at every element (Sides.between);
where they disagree the numerical referee estimates exactly those elements (`disputed`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backprop_check.diagnosis.shapes import shape_slip
from backprop_check.engine.tolerance import Tolerance
from backprop_check.errors import CaseError
from backprop_check.records import MISMATCH, Check, CheckKind, Culprit
from backprop_check.sources import Gradients, largest_gradient
from backprop_check.engine.rounding import Rounding

TINY = torch.finfo(torch.float64).tiny


def ratios(diff: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(diff / allowed.clamp(min=TINY), nan=math.inf, posinf=math.inf)


@dataclass(frozen=True)
class Evidence:
    """What the engine weighs at one point in one dtype: the numerical reference, autograd's and
    manual's gradients (autograd is None for a numpy case, manual without a `.manual`), the
    parameters (in the case's order), the tolerance, and below float64 the dtype's rounding at
    the point (rounding.py)."""

    numerical: Gradients
    autograd: Gradients | None
    manual: Gradients | None
    params: list[str]
    tol: Tolerance
    rounding: Rounding | None = None

    def sides(self, name: str, manual: torch.Tensor | None) -> Sides:
        """Tensor `name` lined up, with `manual` its hand-derived gradient as aligned to it."""
        autograd = None if self.autograd is None else self.autograd.values[name]
        return Sides.of(name, self.numerical, autograd, manual, self.rounding)


@dataclass
class Sides:
    """One tensor's gradients from autograd and manual (flat, float64, CPU), with their
    rounding allowances at this point. A numpy case has no autograd gradient."""

    shape: tuple[int, ...]
    autograd: torch.Tensor | None
    manual: torch.Tensor | None
    rounding_a: torch.Tensor
    rounding_m: torch.Tensor
    # Below float64: each source's float64 twin at the same point (None in float64), and
    # float64's own rounding allowance of it (zeros unless measured).
    twin_a: torch.Tensor | None = None
    twin_m: torch.Tensor | None = None
    twin_rounding_a: torch.Tensor | None = None
    twin_rounding_m: torch.Tensor | None = None

    @classmethod
    def of(
        cls, name: str, numerical: Gradients, autograd: torch.Tensor | None, manual: torch.Tensor | None, rounding: Rounding | None
    ) -> Sides:
        size = numerical.values[name].numel()

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", torch.float64).reshape(-1)

        def allowance(source: str, twin: bool = False) -> torch.Tensor:
            found = None if rounding is None else rounding.twin_allowance if twin else rounding.allowance
            given = None if found is None else found.get(source, {}).get(name)
            return torch.zeros(size, dtype=torch.float64) if given is None or given.numel() != size else flat(given)

        def twin(source: str) -> torch.Tensor | None:
            given = None if rounding is None else rounding.twin.get(source, {}).get(name)
            return None if given is None or given.numel() != size else flat(given)

        return cls(
            tuple(numerical.values[name].shape),
            None if autograd is None else flat(autograd),
            None if manual is None else flat(manual),
            allowance("autograd"),
            allowance("manual"),
            None if autograd is None else twin("autograd"),
            None if manual is None else twin("manual"),
            allowance("autograd", twin=True),
            allowance("manual", twin=True),
        )

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def subject(self) -> torch.Tensor:
        """The gradient the tensor's scale is read from: autograd's, else manual's."""
        chosen = self.autograd if self.autograd is not None else self.manual
        assert chosen is not None
        return chosen

    def between(self, tol: Tolerance, largest: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(|manual − autograd|, allowed) at every element; zeros without both gradients."""
        if self.manual is None or self.autograd is None:
            zeros = torch.zeros(self.size, dtype=torch.float64)
            return zeros, torch.ones_like(zeros)
        allowed = tol.between(self.manual, self.autograd, self.rounding_a + self.rounding_m, largest)
        return (self.manual - self.autograd).abs(), allowed


def disputed(evidence: Evidence, limit: int = 64) -> dict[str, torch.Tensor]:
    """Per name, the flat elements where manual and autograd disagree and the numerical
    reference has no estimate yet: the `limit` worst of them, for the referee to estimate."""
    if evidence.manual is None or evidence.autograd is None:
        return {}
    largest = largest_gradient(evidence.autograd, evidence.params)
    found: dict[str, torch.Tensor] = {}
    for name, estimated in evidence.numerical.checked.items():
        given = evidence.manual.values.get(name)
        if given is None or given.numel() != estimated.numel():
            continue
        ratio = ratios(*evidence.sides(name, given).between(evidence.tol, largest))
        ratio[estimated.reshape(-1)] = 0.0
        bad = (ratio > 1).nonzero().reshape(-1)
        if bad.numel():
            worst = torch.argsort(ratio[bad], descending=True)[:limit]
            found[name] = bad[worst].sort().values
    return found


def aligned_manual(
    manual: Gradients | None,
    params: list[str],
    nodes: list[str],
    numerical: Gradients,
    autograd: Gradients | None,
) -> dict[str, torch.Tensor | Check]:
    """The manual gradient per name, reshaped to the reference's shape. A wrong shape is a slip
    of the derivation, a mismatch of manual (see shapes.py: a transpose, a missing sum over the
    batch, or one that nothing explains); a missing parameter or an unknown name is a broken case."""
    if manual is None:
        return {}
    values = manual.values
    missing = [name for name in params if name not in values]
    unknown = sorted(set(values) - set(params) - set(nodes))
    if missing:
        besides = f" and returns {', '.join(map(repr, unknown))}, which is neither a parameter nor a node (a typo?)"
        raise CaseError(f"the manual gradient misses parameter {missing[0]!r}" + (besides if unknown else ""))
    if unknown:
        raise CaseError(f"the manual gradient returns {unknown[0]!r}, which is neither a parameter nor a node")
    aligned: dict[str, torch.Tensor | Check] = {}
    for name, value in values.items():
        reference = _whole(name, numerical, autograd)
        want = tuple(reference.shape)
        got = tuple(value.shape)
        if value.numel() == reference.numel() and _squeezed(got) == _squeezed(want):
            aligned[name] = value.reshape(want)
            continue
        slip = shape_slip(value, reference)
        aligned[name] = Check(
            name=name,
            kind=CheckKind.PARAM if name in params else CheckKind.NODE,
            shape=want,
            verdict=MISMATCH,
            culprit=Culprit.MANUAL,
            bad=reference.numel(),
            size=reference.numel(),
            ratio=float("inf"),
            abs_err=float("inf"),
            rel_err=float("inf"),
            note=slip.fact(),
            culprits={Culprit.MANUAL: reference.numel()},
            slip=slip,
        )
    return aligned


def _whole(name: str, numerical: Gradients, autograd: Gradients | None) -> torch.Tensor:
    """The reference a wrong shape is diagnosed against: the numerical gradient where every
    element is estimated, else autograd's (exact everywhere; a numpy case has none)."""
    value = numerical.values[name]
    if autograd is None or name not in autograd.values or bool(torch.isfinite(value).all()):
        return value
    return autograd.values[name]


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)
