"""Comparing the three gradients element by element: verdict, culprit and the worst element.

The float64 numerical gradient is the referee. A source that disagrees with it beyond the
error bar plus the compared dtype's rounding is the culprit; when both manual and autograd
disagree with it but agree with each other, the numerical gradient is the odd one out. On a
kink the referee gives an interval (left and right derivatives): any value inside it is a valid
subgradient. NaN and Inf never compare equal to anything.

What manual and autograd say of a tensor is lined up in sides.py (and compared there with each
other at every element); the random directions of a sampled tensor are judged in directions.py.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from backprop_check.engine.directions import along_tensor
from backprop_check.engine.sides import Evidence, Sides, aligned_manual, largest_gradient, ratios
from backprop_check.engine.tolerance import ERROR_BARS, Tolerance
from backprop_check.records import MISMATCH, NONDIFFERENTIABLE, OK, Check, CheckKind, Culprit, unravel
from backprop_check.sources import RANDOM, Gradients



def compare(evidence: Evidence) -> list[Check]:
    """Checks for every parameter, then every node from the loss back toward the parameters.

    `evidence.rounding` says, per source and element, how far the run's dtype may move that
    source's gradient at this point by rounding alone (see rounding.py); it widens that
    source's tolerances. Without autograd (a numpy case) manual is checked against the
    numerical gradient alone."""
    numerical, autograd, manual, params = evidence.numerical, evidence.autograd, evidence.manual, evidence.params
    nodes = [name for name in reversed(numerical.nodes) if name not in params]
    manual_values = aligned_manual(manual, params, nodes, numerical, autograd)
    largest = largest_gradient(autograd or manual, params)
    checks: list[Check] = []
    for name in params + nodes:
        kind = CheckKind.PARAM if name in params else CheckKind.NODE
        given = manual_values.get(name)
        if isinstance(given, Check):
            checks.append(given)
            continue
        checks.append(compare_tensor(name, kind, evidence.sides(name, given), numerical, evidence.tol, largest))
    return checks


@dataclass
class Referee:
    """The numerical reference at the estimated elements of one tensor, with its tolerance."""

    estimated: torch.Tensor  # flat indices
    value: torch.Tensor
    error: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    kink: torch.Tensor
    base: torch.Tensor  # error bars plus the dtype's tolerance, before rounding allowances
    unresolved: torch.Tensor  # the bar there is not the forward's rounding (`Gradients.unresolved`)
    whole: bool = False  # every element estimated: `estimated` is arange(size)

    @classmethod
    def at(cls, name: str, numerical: Gradients, sides: Sides, tol: Tolerance, largest: float = 0.0) -> Referee:
        mask = numerical.checked.get(name)
        size = sides.size
        estimated = torch.arange(size) if mask is None else mask.reshape(-1).nonzero().reshape(-1)
        whole = estimated.numel() == size
        where = _index(estimated, whole)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", torch.float64).reshape(-1)[where]

        n, e = pick(numerical.values[name]), pick(numerical.error[name])
        left, right = pick(numerical.left[name]), pick(numerical.right[name])
        kink = numerical.kink[name].detach().reshape(-1)[where]
        rounding_a, rounding_m = sides.rounding_a[where], sides.rounding_m[where]
        # The arithmetic below in numpy where every operand is a CPU tensor of float64 (bool for
        # the kinks): the same IEEE operations, each a fraction of torch's dispatch on a few elements.
        fast = kink.device.type == "cpu" and all(t.dtype == torch.float64 and t.device.type == "cpu" for t in (rounding_a, rounding_m))
        xp, to = (np, torch.from_numpy) if fast else (torch, lambda t: t)
        n_, e_, left_, right_ = (t.numpy() for t in (n, e, left, right)) if fast else (n, e, left, right)
        lo, hi = xp.minimum(left_, right_), xp.maximum(left_, right_)
        scale = _largest_finite(n)
        if mask is not None:  # a sample's largest value is not the tensor's
            scale = max(scale, _largest_finite(sides.subject))
        elif n.numel() and bool((abs(n_) <= ERROR_BARS * e_).all()):
            # A gradient that is zero at every element has no scale of its own: its atol is the
            # point's (logcumsumexp's order 2 at 1e4: 0 in truth, computed as the rounding of the
            # terms the largest gradient is made of, 1e-12 against 2.9).
            scale = max(scale, largest)
        # The floor: a source's gradient of an element that is exactly zero is its rounding
        # (a bias cancelled by batch normalization: 4.7e-9 in float32), which the allowances
        # measured from that element's own float64 value (1e-18) cannot see.
        base = ERROR_BARS * e_ + tol.allowed(n_, scale) + tol.floor(largest)
        rounding = xp.maximum(rounding_a.numpy(), rounding_m.numpy()) if fast else torch.maximum(rounding_a, rounding_m)
        # Five function values cannot tell a kink from a smooth function's curvature within a
        # step (both move the one-sided derivatives apart, by the jump or by h³·f⁗/16: near
        # a minimum or at log(w) for w = 0.01 the latter passes the numerical source's kink
        # test). A "kink" whose one-sided derivatives agree within the tolerance is none.
        kink = kink & to((hi - lo) > base + rounding)
        lo, hi, base = to(lo), to(hi), to(base)
        unresolved = numerical.unresolved.get(name)
        unresolved = torch.zeros_like(kink) if unresolved is None else unresolved.detach().cpu().reshape(-1)[where].bool()
        return cls(estimated, n, e, lo, hi, kink, base, unresolved, whole)

    def ratio(self, source: torch.Tensor, rounding: torch.Tensor) -> torch.Tensor:
        """|source − reference| / allowed at every element (0 where nothing was estimated); on
        a kink, the distance outside its interval."""
        where = _index(self.estimated, self.whole)
        x, r = source[where], rounding[where]
        inside = (self.left - x).clamp(min=0) + (x - self.right).clamp(min=0)
        diff = torch.where(self.kink, inside, (x - self.value).abs())
        if self.whole:
            return ratios(diff, self.base + r)
        out = torch.zeros_like(source)
        out[where] = ratios(diff, self.base + r)
        return out

    def position(self, element: int) -> int | None:
        if self.whole:
            return element
        found = (self.estimated == element).nonzero()
        return int(found[0, 0]) if found.numel() else None

    def pair(self, element: int, source: torch.Tensor | None, rounding: torch.Tensor) -> tuple[float, float, float] | None:
        """(|source − reference|, allowed, rounding part) at flat `element`, if estimated there."""
        at = self.position(element)
        if source is None or at is None:
            return None
        diff = float((source[element] - self.value[at]).abs())
        return diff, float(self.base[at] + rounding[element]), float(rounding[element])


def _largest_finite(t: torch.Tensor) -> float:
    """The largest |element| among the finite ones of a vector, 0 where none is (for a float64
    CPU vector, the usual one, in numpy: the same comparisons, without torch's dispatch and a
    boolean gather)."""
    if t.dtype != torch.float64 or t.device.type != "cpu":
        finite = t[torch.isfinite(t)]
        return float(finite.abs().max()) if finite.numel() else 0.0
    a = np.abs(t.detach().numpy())
    finite = a[np.isfinite(a)]
    return float(finite.max()) if finite.size else 0.0


# How a comparison of the float64 twins is named ("manual vs numerical (float64 twins)").
TWINS = "(float64 twins)"


def _index(estimated: torch.Tensor, whole: bool) -> torch.Tensor | slice:
    """The estimated elements as an index: every element as a slice (a view, not a gather)."""
    return slice(None) if whole else estimated


def compare_tensor(
    name: str, kind: str, sides: Sides, numerical: Gradients, tol: Tolerance, largest: float = 0.0
) -> Check:
    """Compare one tensor's gradients: manual against autograd at every element, each against
    the numerical reference where it was estimated, and along its random directions."""
    size = sides.size
    referee = Referee.at(name, numerical, sides, tol, largest)
    ma_diff, ma_allowed = sides.between(tol, largest)
    none = torch.zeros(size, dtype=torch.float64)
    # Without both exact gradients `between` gives 0 of 1 allowed everywhere: ratios of 0.
    ma_ratio = ratios(ma_diff, ma_allowed) if sides.manual is not None and sides.autograd is not None else torch.zeros(size, dtype=torch.float64)
    a_ratio = none if sides.autograd is None else referee.ratio(sides.autograd, sides.rounding_a)
    m_ratio = none if sides.manual is None else referee.ratio(sides.manual, sides.rounding_m)
    pairs = _pairs(sides, referee, (ma_diff, ma_allowed))
    exact = None
    if tol.twin is not None and (sides.twin_a is not None or sides.twin_m is not None):
        # Below float64 the float64 twins are judged too, by float64's tolerance: a derivation
        # bug is in them as well, without the dtype's rounding to hide in (a numpy case's manual
        # gradient has a twin and no autograd beside it).
        # Float64's own rounding of them, where measured (`rounding.float64_allowances`, as a
        # float64 run judges the same code again before it reports a mismatch).
        exact = Sides(
            sides.shape, sides.twin_a, sides.twin_m,
            torch.zeros_like(sides.rounding_a) if sides.twin_rounding_a is None else sides.twin_rounding_a,
            torch.zeros_like(sides.rounding_m) if sides.twin_rounding_m is None else sides.twin_rounding_m,
        )
        twin_referee = Referee.at(name, numerical, exact, tol.twin, largest)
        twin_ma = exact.between(tol.twin, largest)
        if exact.autograd is not None:
            a_ratio = torch.maximum(a_ratio, twin_referee.ratio(exact.autograd, exact.rounding_a))
        if exact.manual is not None:
            m_ratio = torch.maximum(m_ratio, twin_referee.ratio(exact.manual, exact.rounding_m))
            ma_ratio = torch.maximum(ma_ratio, ratios(*twin_ma))
        pairs.update({f"{k} {TWINS}": v for k, v in _pairs(exact, twin_referee, twin_ma).items()})
    kink = torch.zeros(size, dtype=torch.bool)
    kink[referee.estimated] = referee.kink
    vacuous = _vacuous(referee, sides, largest)
    a_ok, m_ok, ma_ok = a_ratio <= 1, m_ratio <= 1, ma_ratio <= 1
    bad = ~(a_ok & m_ok & ma_ok)
    disagree = bool(bad.any())
    culprit = _culprits(m_ok, a_ok, ma_ok, has_manual=sides.manual is not None) if disagree else None
    counts = _counts(bad, culprit) if culprit is not None else {}
    along = along_tensor(name, numerical, sides, tol)
    # The random directions that judged: one on a kink at the point only guided a bisection.
    directions = sum(d.what == RANDOM and not d.kink for d in numerical.directions.get(name, []))
    check = Check(
        name=name,
        kind=kind,
        shape=sides.shape,
        verdict=MISMATCH if disagree or along.bad else (NONDIFFERENTIABLE if bool(kink.any() or vacuous.any()) else OK),
        size=size,
        bad=int(bad.sum()),
        kinks=int(kink.sum()),
        culprits=counts,
        coverage={
            "elements": size,
            "manual_vs_autograd": size if sides.manual is not None and sides.autograd is not None else 0,
            "numerical": int(referee.estimated.numel()),
            "directions": directions,
        },
    )
    if size == 0:
        return check
    if not disagree and along.bad:
        return along.mismatch(check)
    ratio = torch.maximum(torch.maximum(a_ratio, m_ratio), ma_ratio)
    # The element shown: a disagreeing one first, else one on a kink (what a nondifferentiable
    # verdict is about), else the closest call.
    rank = torch.where(bad, ratio + 1e300, torch.where(kink | vacuous, ratio + 1e200, ratio))
    worst = int(torch.argmax(rank))
    check.index = unravel(worst, sides.shape)
    check.autograd = None if sides.autograd is None else float(sides.autograd[worst])
    check.manual = None if sides.manual is None else float(sides.manual[worst])
    at = referee.position(worst)
    if at is not None:
        check.numerical, check.error_bar = float(referee.value[at]), float(referee.error[at])
    if referee.estimated.numel() < size:
        check.note = (
            f"{referee.estimated.numel()} of {size} elements estimated numerically, the rest along "
            f"{directions} random directions"
            + ("; manual against autograd at every element" if sides.manual is not None and sides.autograd is not None else "")
        )
    odd = _name_of(int(culprit[worst])) if culprit is not None and bool(bad[worst]) else None
    check.culprit = _single(counts) if disagree else None
    _decisive(check, worst, odd, pairs)
    if exact is not None and (check.compared or "").endswith(TWINS):
        twin = {"manual": exact.manual, "autograd": exact.autograd}.get(check.compared.split(" vs ")[0])
        check.twin = None if twin is None or check.compared.startswith("manual vs autograd") else float(twin[worst])
    if at is not None and bool(kink[worst]):
        check.note = f"kink: left derivative {float(referee.left[at]):.6g}, right {float(referee.right[at]):.6g}"
    elif at is not None and bool(vacuous[worst]) and not disagree:
        check.note = (
            f"unresolved: the finite differences do not settle at {check.label} (± {float(referee.error[at]):.3g}, "
            f"over {VACUOUS_BARS:g}× its value and every gradient at the point): the function jumps or turns sharply here (pinv "
            "of a rank-deficient matrix is discontinuous), and no gradient can be confirmed at this point"
        )
    return check


# An estimate whose bar is not the forward's rounding (`Gradients.unresolved`) and this many times
# beyond both its own value and the point's largest gradient settled nowhere (a discontinuity at
# the point): it confirms any gradient, so it is no verdict, never an ok.
VACUOUS_BARS = 1e3


def _vacuous(referee: Referee, sides: Sides, point_largest: float = 0.0) -> torch.Tensor:
    """Per element, whether its estimate's bar is vacuous (VACUOUS_BARS): beyond its value and
    the largest gradient of the tensor and of the point (a bias that batch normalization cancels
    has a gradient of 1e-18 in truth 0, and a bar of 1e-13 set by the loss's other terms)."""
    vacuous = torch.zeros(sides.size, dtype=torch.bool)
    if not bool(referee.unresolved.any()):  # every bar is the forward's rounding: the usual case
        return vacuous
    # (a tensor with no finite element adds nothing: its largest finite |element| is 0, no more than the point's)
    largest = max([point_largest, *(_largest_finite(t) for t in (sides.autograd, sides.manual, referee.value) if t is not None)])
    if largest == 0.0:
        return vacuous
    if referee.error.dtype == referee.value.dtype == torch.float64 and referee.error.device.type == referee.value.device.type == "cpu":
        # (always: numpy's ops, the same IEEE ones)
        beyond = torch.from_numpy(referee.error.numpy() > VACUOUS_BARS * np.maximum(np.abs(referee.value.numpy()), largest))
    else:
        beyond = referee.error > VACUOUS_BARS * torch.maximum(referee.value.abs(), torch.tensor(largest, dtype=torch.float64))
    vacuous[referee.estimated] = beyond & referee.unresolved & ~referee.kink
    return vacuous


Pair = Callable[[int], "tuple[float, float, float] | None"]


def _pairs(sides: Sides, referee: Referee, between: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Pair]:
    """Each comparison made, as a function of a flat element: (difference, allowed, rounding
    part), or None where it was not made."""
    ma_diff, ma_allowed = between

    def manual_autograd(i: int) -> tuple[float, float, float] | None:
        if sides.manual is None or sides.autograd is None:
            return None
        return float(ma_diff[i]), float(ma_allowed[i]), float(sides.rounding_a[i] + sides.rounding_m[i])

    return {
        "manual vs numerical": lambda i: referee.pair(i, sides.manual, sides.rounding_m),
        "autograd vs numerical": lambda i: referee.pair(i, sides.autograd, sides.rounding_a),
        "manual vs autograd": manual_autograd,
    }


def _decisive(check: Check, worst: int, odd: Culprit | None, pairs: dict[str, Pair]) -> None:
    """Fill in the error, tolerance and ratio of the comparison the verdict at the shown
    element rests on (the culprit's against the reference where it can be, else the one
    furthest outside its tolerance), so that the message printed from them agrees with itself."""
    known = {k: v for k, v in ((k, pair(worst)) for k, pair in pairs.items()) if v is not None}
    if not known:
        return

    def ratio(key: str) -> float:
        diff, allowed, _ = known[key]
        return diff / allowed if allowed > 0 else (math.inf if diff else 0.0)

    candidates = [k for k in known if odd and k.startswith(f"{odd} vs numerical")]
    preferred = max(candidates or known, key=ratio)
    diff, allowed, rounding = known[preferred]
    check.compared = preferred
    check.abs_err, check.allowed, check.rounding = diff, allowed, rounding
    check.ratio = ratio(preferred)
    base = check.numerical if "vs numerical" in preferred else check.autograd
    check.rel_err = diff / abs(base) if base else (math.inf if diff else 0.0)


def _counts(bad: torch.Tensor, culprit: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    for who, code in _CODES.items():
        count = int((bad & (culprit == code)).sum())
        if count:
            counts[who] = count
    return counts


# Per-element culprit codes in a tensor; 0: no culprit (the three agree).
_CODES = {Culprit.MANUAL: 1, Culprit.AUTOGRAD: 2, Culprit.NUMERICAL: 3, Culprit.UNKNOWN: 4, Culprit.UNDECIDED: 5}


def _name_of(code: int) -> Culprit | None:
    return {v: k for k, v in _CODES.items()}[code] if code else None


def _culprits(m_ok: torch.Tensor, a_ok: torch.Tensor, ma_ok: torch.Tensor, *, has_manual: bool) -> torch.Tensor:
    """Per element, the source that disagrees with the other two (codes of `_CODES`)."""
    code = torch.full(m_ok.shape, _CODES[Culprit.UNKNOWN], dtype=torch.int64)
    code[m_ok & a_ok & ma_ok] = 0
    code[~m_ok & a_ok] = _CODES[Culprit.MANUAL]
    code[m_ok & ~a_ok] = _CODES[Culprit.AUTOGRAD]
    code[~m_ok & ~a_ok & ma_ok] = _CODES[Culprit.NUMERICAL]
    code[m_ok & a_ok & ~ma_ok] = _CODES[Culprit.UNDECIDED]
    if not has_manual:  # two-way: the float64 reference referees autograd alone
        code[~a_ok] = _CODES[Culprit.AUTOGRAD]
    return code


def _single(counts: dict[str, int]) -> Culprit | None:
    """The culprit when every disagreeing element names the same one, else None; elements the
    referee cannot decide name no one, and so do not contradict the others."""
    named = set(counts) - {Culprit.UNDECIDED}
    return Culprit(named.pop()) if len(named) == 1 and Culprit.UNKNOWN not in counts else None




