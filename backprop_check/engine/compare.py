"""Comparing the three gradients element by element: verdict, culprit and the worst element.

The float64 numerical gradient is the referee. A source that disagrees with it beyond the
error bar plus the compared dtype's rounding is the culprit; when both manual and autograd
disagree with it but agree with each other, the numerical gradient is the odd one out. On a
kink the referee gives an interval (left and right derivatives): any value inside it is a valid
subgradient. NaN and Inf never compare equal to anything.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from backprop_check.errors import CaseError
from backprop_check.diagnosis.shapes import shape_slip
from backprop_check.records import MISMATCH, NONDIFFERENTIABLE, OK, Check, CheckKind, Culprit
from backprop_check.sources import Direction, Gradients
from backprop_check.sources.rounding import Rounding as Noise
from backprop_check.engine.tolerance import ERROR_BARS, Tolerance



def compare(
    numerical: Gradients,
    autograd: Gradients | None,
    manual: Gradients | None,
    params: list[str],
    tol: Tolerance,
    noise: Noise | None = None,
) -> list[Check]:
    """Checks for every parameter, then every node from the loss back toward the parameters.

    `noise[source][name]` is, per element, how far the run's dtype may move that source's
    gradient at this point by rounding alone (see rounding.py); it widens that source's
    tolerances. `autograd` is None for a numpy case: manual is then checked against the
    numerical gradient alone."""
    nodes = [name for name in reversed(numerical.nodes) if name not in params]
    manual_values = _manual_values(manual, params, nodes, numerical, autograd)
    largest = largest_gradient(autograd or manual, params)
    checks: list[Check] = []
    for name in params + nodes:
        kind = CheckKind.PARAM if name in params else CheckKind.NODE
        given = manual_values.get(name)
        if isinstance(given, Check):
            checks.append(given)
            continue
        sides = Sides.of(name, numerical, None if autograd is None else autograd.values[name], given, noise)
        checks.append(compare_tensor(name, kind, sides, numerical, tol, largest))
    return checks


TINY = torch.finfo(torch.float64).tiny


def largest_gradient(source: Gradients | None, params: list[str]) -> float:
    """The largest finite |dloss/dparam| at the point: the scale of its rounding floor."""
    largest = 0.0
    for name in params:
        if source is None or name not in source.values:
            continue
        value = source.values[name].detach()
        finite = value[torch.isfinite(value)]
        if finite.numel():
            largest = max(largest, float(finite.abs().max()))
    return largest


def _ratio(diff: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(diff / allowed.clamp(min=TINY), nan=math.inf)


@dataclass
class Sides:
    """One tensor's gradients from autograd and manual (flat, float64, CPU), with their
    rounding allowances at this point. A numpy case has no autograd gradient."""

    shape: tuple[int, ...]
    autograd: torch.Tensor | None
    manual: torch.Tensor | None
    rounding_a: torch.Tensor
    rounding_m: torch.Tensor
    # Below float64: each source's float64 twin at the same point (None in float64).
    twin_a: torch.Tensor | None = None
    twin_m: torch.Tensor | None = None

    @classmethod
    def of(
        cls, name: str, numerical: Gradients, autograd: torch.Tensor | None, manual: torch.Tensor | None, noise: Noise | None
    ) -> Sides:
        size = numerical.values[name].numel()

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", torch.float64).reshape(-1)

        def allowance(source: str) -> torch.Tensor:
            given = None if noise is None else noise.allowance.get(source, {}).get(name)
            return torch.zeros(size, dtype=torch.float64) if given is None or given.numel() != size else flat(given)

        def twin(source: str) -> torch.Tensor | None:
            given = None if noise is None else noise.twin.get(source, {}).get(name)
            return None if given is None or given.numel() != size else flat(given)

        return cls(
            tuple(numerical.values[name].shape),
            None if autograd is None else flat(autograd),
            None if manual is None else flat(manual),
            allowance("autograd"),
            allowance("manual"),
            None if autograd is None else twin("autograd"),
            None if manual is None else twin("manual"),
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


def disputed(
    numerical: Gradients,
    autograd: Gradients,
    manual: Gradients | None,
    params: list[str],
    tol: Tolerance,
    noise: Noise | None = None,
    limit: int = 64,
) -> dict[str, torch.Tensor]:
    """Per name, the flat elements where manual and autograd disagree and the numerical
    reference has no estimate yet: the `limit` worst of them, for the referee to estimate."""
    if manual is None or autograd is None:
        return {}
    largest = largest_gradient(autograd, params)
    found: dict[str, torch.Tensor] = {}
    for name, estimated in numerical.checked.items():
        given = manual.values.get(name)
        if given is None or given.numel() != estimated.numel():
            continue
        sides = Sides.of(name, numerical, autograd.values[name], given, noise)
        ratio = _ratio(*sides.between(tol, largest))
        ratio[estimated.reshape(-1)] = 0.0
        bad = (ratio > 1).nonzero().reshape(-1)
        if bad.numel():
            worst = torch.argsort(ratio[bad], descending=True)[:limit]
            found[name] = bad[worst].sort().values
    return found


def agreement(
    name: str, numerical: Gradients, autograd: Gradients, manual: Gradients | None, tol: Tolerance, noise: Noise | None = None
) -> Callable[[Direction], bool]:
    """Whether every source's derivative of `name` along a direction matches the numerical one."""
    given = None if manual is None else manual.values.get(name)
    if given is not None and given.numel() != numerical.values[name].numel():
        given = None
    sides = Sides.of(name, numerical, None if autograd is None else autograd.values[name], given, noise)

    def agrees(direction: Direction) -> bool:
        return all(direction_verdict(direction, g, r, tol, exact)[0] for g, r, exact in sides_along(sides).values())

    return agrees


def failing_directions(
    numerical: Gradients, autograd: Gradients, manual: Gradients | None, tol: Tolerance, noise: Noise | None = None
) -> list[tuple[str, Direction, Callable[[Direction], bool]]]:
    """(name, direction, agrees) for each direction of a sampled tensor that some source's
    gradient does not match; `agrees` tells the same of any other direction in that tensor."""
    failing = []
    for name, directions in numerical.directions.items():
        agrees = agreement(name, numerical, autograd, manual, tol, noise)
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
    direction: Direction, gradient: torch.Tensor, rounding: torch.Tensor | None, tol: Tolerance, exact: bool = False
) -> tuple[bool, float, float]:
    """(agrees, the source's derivative along `direction`, allowed difference). On a kink
    along it, any value between the one-sided derivatives agrees (a subgradient); a
    non-finite estimate proves nothing and counts as a disagreement to look into."""
    vector = direction.vector.reshape(-1).to(torch.float64)
    value = float((gradient * vector).sum())
    allowed = ERROR_BARS * direction.error + tol.along(gradient, vector, rounding, exact=exact)
    if not math.isfinite(direction.value):
        return False, value, allowed
    if direction.kink and math.isfinite(direction.left) and math.isfinite(direction.right):
        low, high = min(direction.left, direction.right), max(direction.left, direction.right)
        outside = max(low - value, value - high, 0.0)
        return outside <= allowed, value, allowed
    return abs(value - direction.value) <= allowed, value, allowed


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

    @classmethod
    def at(cls, name: str, numerical: Gradients, sides: Sides, tol: Tolerance, largest: float = 0.0) -> Referee:
        mask = numerical.checked.get(name)
        size = sides.size
        estimated = torch.arange(size) if mask is None else mask.reshape(-1).nonzero().reshape(-1)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", torch.float64).reshape(-1)[estimated]

        n, e = pick(numerical.values[name]), pick(numerical.error[name])
        lo = torch.minimum(pick(numerical.left[name]), pick(numerical.right[name]))
        hi = torch.maximum(pick(numerical.left[name]), pick(numerical.right[name]))
        finite = n[torch.isfinite(n)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        if mask is not None:  # a sample's largest value is not the tensor's
            known = sides.subject[torch.isfinite(sides.subject)]
            scale = max(scale, float(known.abs().max()) if known.numel() else 0.0)
        # The floor: a source's gradient of an element that is exactly zero is its rounding
        # (a bias cancelled by batch normalization: 4.7e-9 in float32), which the allowances
        # measured from that element's own float64 value (1e-18) cannot see.
        base = ERROR_BARS * e + tol.allowed(n, scale) + tol.floor(largest)
        rounding = torch.maximum(sides.rounding_a[estimated], sides.rounding_m[estimated])
        kink = numerical.kink[name].reshape(-1)[estimated]
        # Five function values cannot tell a kink from a smooth function's curvature within a
        # step (both move the one-sided derivatives apart, by the jump or by h³·f⁗/16: near
        # a minimum or at log(w) for w = 0.01 the latter passes the numerical source's kink
        # test). A "kink" whose one-sided derivatives agree within the tolerance is none.
        kink = kink & ((hi - lo) > base + rounding)
        return cls(estimated, n, e, lo, hi, kink, base)

    def ratio(self, source: torch.Tensor, rounding: torch.Tensor) -> torch.Tensor:
        """|source − reference| / allowed at every element (0 where nothing was estimated); on
        a kink, the distance outside its interval."""
        x, r = source[self.estimated], rounding[self.estimated]
        inside = (self.left - x).clamp(min=0) + (x - self.right).clamp(min=0)
        diff = torch.where(self.kink, inside, (x - self.value).abs())
        out = torch.zeros_like(source)
        out[self.estimated] = _ratio(diff, self.base + r)
        return out

    def position(self, element: int) -> int | None:
        found = (self.estimated == element).nonzero()
        return int(found[0, 0]) if found.numel() else None

    def pair(self, element: int, source: torch.Tensor | None, rounding: torch.Tensor) -> tuple[float, float, float] | None:
        """(|source − reference|, allowed, rounding part) at flat `element`, if estimated there."""
        at = self.position(element)
        if source is None or at is None:
            return None
        diff = float((source[element] - self.value[at]).abs())
        return diff, float(self.base[at] + rounding[element]), float(rounding[element])


def compare_tensor(
    name: str, kind: str, sides: Sides, numerical: Gradients, tol: Tolerance, largest: float = 0.0
) -> Check:
    """Compare one tensor's gradients: manual against autograd at every element, each against
    the numerical reference where it was estimated, and along its random directions."""
    size = sides.size
    referee = Referee.at(name, numerical, sides, tol, largest)
    ma_diff, ma_allowed = sides.between(tol, largest)
    ma_ratio = _ratio(ma_diff, ma_allowed)
    none = torch.zeros(size, dtype=torch.float64)
    a_ratio = none if sides.autograd is None else referee.ratio(sides.autograd, sides.rounding_a)
    m_ratio = none if sides.manual is None else referee.ratio(sides.manual, sides.rounding_m)
    pairs = _pairs(sides, referee, (ma_diff, ma_allowed))
    if tol.twin is not None and sides.twin_a is not None:
        # Below float64 the float64 twins are judged too, by float64's tolerance: a derivation
        # bug is in them as well, without the dtype's rounding to hide in.
        exact = Sides(sides.shape, sides.twin_a, sides.twin_m, torch.zeros_like(sides.rounding_a), torch.zeros_like(sides.rounding_m))
        twin_referee = Referee.at(name, numerical, exact, tol.twin, largest)
        twin_ma = exact.between(tol.twin, largest)
        a_ratio = torch.maximum(a_ratio, twin_referee.ratio(exact.autograd, exact.rounding_a))
        if exact.manual is not None:
            m_ratio = torch.maximum(m_ratio, twin_referee.ratio(exact.manual, exact.rounding_m))
            ma_ratio = torch.maximum(ma_ratio, _ratio(*twin_ma))
        pairs.update({f"{k} (float64 twins)": v for k, v in _pairs(exact, twin_referee, twin_ma).items()})
    kink = torch.zeros(size, dtype=torch.bool)
    kink[referee.estimated] = referee.kink
    a_ok, m_ok, ma_ok = a_ratio <= 1, m_ratio <= 1, ma_ratio <= 1
    bad = ~(a_ok & m_ok & ma_ok)
    culprit = _culprits(m_ok, a_ok, ma_ok, has_manual=sides.manual is not None)
    counts = _counts(bad, culprit)
    along = _directions(name, numerical, sides, tol)
    directions = len(numerical.directions.get(name, []))
    check = Check(
        name=name,
        kind=kind,
        shape=sides.shape,
        verdict=MISMATCH if bool(bad.any()) or along.bad else (NONDIFFERENTIABLE if bool(kink.any()) else OK),
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
    if not bool(bad.any()) and along.bad:
        return along.mismatch(check)
    ratio = torch.maximum(torch.maximum(a_ratio, m_ratio), ma_ratio)
    # The element shown: a disagreeing one first, else one on a kink (what a nondifferentiable
    # verdict is about), else the closest call.
    rank = torch.where(bad, ratio + 1e300, torch.where(kink, ratio + 1e200, ratio))
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
    odd = _name_of(int(culprit[worst])) if bool(bad[worst]) else None
    check.culprit = _single(counts) if bool(bad.any()) else None
    _decisive(check, worst, odd, pairs)
    if at is not None and bool(kink[worst]):
        check.note = f"kink: left derivative {float(referee.left[at]):.6g}, right {float(referee.right[at]):.6g}"
    return check


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

    def mismatch(self, check: Check) -> Check:
        """`check` as a mismatch seen along a direction, no single element located."""
        check.culprit = self.culprit
        check.culprits = {self.culprit or Culprit.UNKNOWN: 1}
        check.numerical, check.error_bar = self.numerical, self.error
        check.autograd, check.manual = self.sources.get("autograd"), self.sources.get("manual")
        check.abs_err, check.allowed, check.ratio = self.diff, self.allowed, self.ratio
        check.rel_err = self.diff / abs(self.numerical) if self.numerical else math.inf
        check.compared = "along a random direction"
        check.note = self.note
        return check


def _directions(name: str, numerical: Gradients, sides: Sides, tol: Tolerance) -> Along:
    result = Along()
    sources = sides_along(sides)
    for direction in numerical.directions.get(name, []):
        verdicts = {source: direction_verdict(direction, g, r, tol, exact) for source, (g, r, exact) in sources.items()}
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
        result.numerical, result.error = direction.value, direction.error
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
        result.note = (
            f"along a random direction, numerical {direction.value:.8g} ± {direction.error:.2g}, {shown} "
            f"(allowed {result.allowed:.3g}); no single element could be located (the error is spread "
            "thinly over many elements, or the direction crosses a kink)"
        )
    return result


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


def _manual_values(
    manual: Gradients | None,
    params: list[str],
    nodes: list[str],
    numerical: Gradients,
    autograd: Gradients | None,
) -> dict[str, torch.Tensor | Check]:
    """The manual gradient per name, reshaped to the reference's shape. A wrong shape that a
    derivation explains (a transpose, a missing sum over the batch: see shapes.py) becomes a
    mismatch; any other wrong shape, a missing parameter or an unknown name is a broken case."""
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
        if slip is None:
            raise CaseError(f"the manual gradient for {name!r} has shape {got}, expected {want}")
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


def unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index of element `flat` of a tensor of `shape` (torch.unravel_index imports sympy on
    its first call, half a second of start-up)."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)
