"""Along random directions: a sampled tensor's gradients projected on the numerical
referee's directional derivatives, with an honest error budget (the directional error bar plus
the projection's rounding, √n for random signs: Tolerance.along), and what a disagreement says.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from backprop_check.engine.sides import TINY, Evidence, Sides
from backprop_check.engine.tolerance import ERROR_BARS, Tolerance
from backprop_check.records import Check, Culprit
from backprop_check.sources import RANDOM, Direction, Gradients


def agreement(name: str, evidence: Evidence) -> Callable[[Direction], bool]:
    """Whether every source's derivative of `name` along a direction matches the numerical one."""
    manual = evidence.manual
    given = None if manual is None else manual.values.get(name)
    if given is not None and given.numel() != evidence.numerical.values[name].numel():
        given = None
    sides = evidence.sides(name, given)

    def agrees(direction: Direction) -> bool:
        return all(direction_verdict(direction, g, r, evidence.tol, exact)[0] for g, r, exact in sides_along(sides).values())

    return agrees


def failing_directions(evidence: Evidence) -> list[tuple[str, Direction, Callable[[Direction], bool]]]:
    """(name, direction, agrees) for each direction of a sampled tensor that some source's
    gradient does not match; `agrees` tells the same of any other direction in that tensor."""
    failing = []
    for name, directions in evidence.numerical.directions.items():
        agrees = agreement(name, evidence)
        failing.extend((name, d, agrees) for d in directions if not agrees(d))
    return failing


def sides_along(sides: Sides) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, bool]]:
    """The gradients to project on a direction: (gradient, rounding allowance, exact) per
    source, where `exact` marks a float64 twin judged with float64's rounding alone."""
    out = {}
    if sides.autograd is not None:
        out["autograd"] = (sides.autograd, sides.rounding_a if bool(sides.rounding_a.any()) else None, False)
    if sides.manual is not None:
        out["manual"] = (sides.manual, sides.rounding_m if bool(sides.rounding_m.any()) else None, False)
    if sides.twin_a is not None:
        out["autograd in float64"] = (sides.twin_a, None, True)
    if sides.twin_m is not None:
        out["manual in float64"] = (sides.twin_m, None, True)
    return out


def direction_verdict(
    direction: Direction,
    gradient: torch.Tensor,
    rounding: torch.Tensor | None,
    tol: Tolerance,
    exact: bool = False,
    verdict: bool = False,
) -> tuple[bool, float, float]:
    """(agrees, the source's derivative along `direction`, allowed difference). On a kink
    along it, any value between the one-sided derivatives agrees (a subgradient); a
    non-finite estimate proves nothing and counts as a disagreement to look into.

    One tolerance, said once. A direction is first a detector, with no rtol at all (`verdict`
    False): what it flags is bisected down to elements, and each is judged by the elementwise
    rule, so one wrong element among a million still shows. What no element explains is
    then judged as a value of its own (`verdict` True): the rtol an element gets,
    rtol·|reference|, is the rtol the directional derivative gets, so a gradient off by a
    uniform relative error within rtol (a constant rounded to float32 inside a float64
    backward: 1e-8) passes elementwise and along directions alike."""
    vector = direction.vector.reshape(-1).to(torch.float64)
    value = float((gradient * vector).sum())
    rtol = (tol.twin.rtol if exact and tol.twin is not None else tol.rtol) if verdict else 0.0
    allowed = ERROR_BARS * direction.error + rtol * abs(direction.value) + tol.along(gradient, vector, rounding, exact=exact)
    if not math.isfinite(direction.value):
        return False, value, allowed
    if direction.kink and math.isfinite(direction.left) and math.isfinite(direction.right):
        low, high = min(direction.left, direction.right), max(direction.left, direction.right)
        outside = max(low - value, value - high, 0.0)
        return outside <= allowed, value, allowed
    return abs(value - direction.value) <= allowed, value, allowed


@dataclass
class Along:
    """The worst disagreement of one sampled tensor's gradients along its random directions."""

    bad: bool = False
    culprit: Culprit | None = None
    note: str = ""
    ratio: float = 0.0
    diff: float = 0.0
    allowed: float = 0.0
    sources: dict[str, float] = field(default_factory=dict)
    numerical: float = 0.0
    error: float = 0.0
    what: str = RANDOM

    def mismatch(self, check: Check) -> Check:
        """`check` as a mismatch seen along a direction, no single element located."""
        check.culprit = self.culprit
        check.culprits = {self.culprit or Culprit.UNKNOWN: 1}
        check.numerical, check.error_bar = self.numerical, self.error
        check.autograd, check.manual = self.sources.get("autograd"), self.sources.get("manual")
        check.abs_err, check.allowed, check.ratio = self.diff, self.allowed, self.ratio
        check.rel_err = self.diff / abs(self.numerical) if self.numerical else math.inf
        check.compared = f"along {self.what}"
        check.note = self.note
        return check


def along_tensor(name: str, numerical: Gradients, sides: Sides, tol: Tolerance) -> Along:
    """The worst disagreement of `name`'s gradients along the referee's random directions."""
    result = Along()
    directions = numerical.directions.get(name)
    if not directions:  # every element estimated (the usual tiny check): nothing to project
        return result
    sources = sides_along(sides)
    for direction in directions:
        if direction.kink:
            # A kink at the point along a direction may be several (relu at exact zeros, a pool
            # over tied values): their one-sided derivatives add up per side, a subgradient per
            # kink, and the sum of those need not lie between the two sums. Such a direction only
            # leads the bisection to elements, each judged alone (`refereed`).
            continue
        verdicts = {
            source: direction_verdict(direction, g, r, tol, exact, verdict=True) for source, (g, r, exact) in sources.items()
        }
        failed = {source for source, (ok, _, _) in verdicts.items() if not ok}
        if not failed:
            continue
        off = {s: abs(verdicts[s][1] - direction.value) for s in failed}
        worst = max(failed, key=lambda s: off[s] / max(verdicts[s][2], TINY))
        ratio = off[worst] / max(verdicts[worst][2], TINY)
        ratio = ratio if math.isfinite(ratio) else math.inf
        if result.bad and ratio <= result.ratio:
            continue
        result.bad, result.ratio = True, ratio
        result.diff, result.allowed = off[worst], verdicts[worst][2]
        result.sources = {source: value for source, (_, value, _) in verdicts.items()}
        result.numerical, result.error, result.what = direction.value, direction.error, direction.what
        if not math.isfinite(direction.value):
            result.culprit = None
        elif "autograd" not in sources:
            result.culprit = Culprit.MANUAL
        elif "manual" not in sources or not any(s.startswith("manual") for s in failed):
            result.culprit = Culprit.AUTOGRAD
        elif not any(s.startswith("autograd") for s in failed):
            result.culprit = Culprit.MANUAL
        else:  # both off the reference while agreeing element by element: two against one
            result.culprit = Culprit.NUMERICAL
        shown = ", ".join(f"{source} {value:.8g}" for source, value in result.sources.items())
        relative = result.diff / abs(direction.value) if direction.value else math.inf
        if direction.what != RANDOM:  # a tie moved together (`Reference.with_ties`)
            seen = (
                "tied elements moved apart are a kink, but a tie moved together is not: the sum of their gradients "
                "is the derivative along it (a max's or a pool's gradient routed to every tied element?)"
            )
        else:
            seen = f"a relative difference of {relative:.2g} along it, spread over many elements: no single one could be located"
        result.note = (
            f"along {direction.what}, numerical {direction.value:.8g} ± {direction.error:.2g}, {shown} "
            f"(allowed {result.allowed:.3g}); {seen}"
        )
    return result
