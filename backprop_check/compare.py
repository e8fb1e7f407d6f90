"""Comparing the three gradients element by element: verdict, culprit and the worst element.

The float64 numerical gradient is the referee. A source that disagrees with it beyond the
error bar plus the compared dtype's rounding is the culprit; when both manual and autograd
disagree with it but agree with each other, the numerical gradient is the odd one out. On a
kink the referee gives an interval (left and right derivatives): any value inside it is a valid
subgradient. NaN and Inf never compare equal to anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import CaseError
from .sources import Direction, Gradients
from .tolerance import ERROR_BARS, Tolerance

OK, MISMATCH, NONDIFFERENTIABLE = "ok", "mismatch", "nondifferentiable"


@dataclass
class Check:
    """One parameter or node at one point: its worst element and how it compared."""

    name: str
    kind: str  # "param" or "node"
    shape: tuple[int, ...]
    verdict: str
    culprit: str | None = None
    index: tuple[int, ...] | None = None
    manual: float | None = None
    numerical: float | None = None
    autograd: float | None = None
    error_bar: float | None = None
    abs_err: float = 0.0
    rel_err: float = 0.0
    allowed: float = 0.0
    ratio: float = 0.0  # worst |difference| / allowed: below 1 is inside the tolerance
    rounding: float = 0.0  # the part of `allowed` that is the run dtype's rounding at this point
    bad: int = 0
    kinks: int = 0
    size: int = 1
    note: str | None = None
    culprits: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`W1[2, 3]`: the name and the worst element's index."""
        if self.index is None or len(self.index) == 0:
            return self.name
        return f"{self.name}[{', '.join(map(str, self.index))}]"

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "index": None if self.index is None else list(self.index),
            "verdict": self.verdict,
            "culprit": self.culprit,
            "manual": self.manual,
            "numerical": self.numerical,
            "numerical_error": self.error_bar,
            "autograd": self.autograd,
            "abs_err": self.abs_err,
            "rel_err": self.rel_err,
            "tolerance": self.allowed,
            "tolerance_ratio": self.ratio,
            "rounding_allowance": self.rounding,
            "bad_elements": self.bad,
            "kink_elements": self.kinks,
            "elements": self.size,
            "note": self.note,
        }


def compare(
    numerical: Gradients,
    autograd: Gradients | None,
    manual: Gradients | None,
    params: list[str],
    tol: Tolerance,
    noise: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[Check]:
    """Checks for every parameter, then every node from the loss back toward the parameters.

    `noise[source][name]` is, per element, how far the run's dtype may move that source's
    gradient at this point by rounding alone (see rounding.py); it widens that source's
    tolerances. `autograd` is None for a numpy case: manual is then checked against the
    numerical gradient alone."""
    nodes = [name for name in reversed(numerical.nodes) if name not in params]
    manual_values = _manual_values(manual, params, nodes, numerical.values)
    checks: list[Check] = []
    for name in params + nodes:
        kind = "param" if name in params else "node"
        given = manual_values.get(name)
        if isinstance(given, Check):
            checks.append(given)
            continue
        rounding = {source: values.get(name) for source, values in (noise or {}).items()}
        a = None if autograd is None else autograd.values[name]
        checks.append(compare_tensor(name, kind, numerical, a, given, tol, rounding))
    return checks


def compare_tensor(
    name: str,
    kind: str,
    numerical: Gradients,
    autograd: torch.Tensor | None,
    manual: torch.Tensor | None,
    tol: Tolerance,
    noise: dict[str, torch.Tensor | None] | None = None,
) -> Check:
    """Compare one tensor's gradients element by element (`noise`: rounding allowance by source)."""
    shape = tuple(numerical.values[name].shape)
    mask = numerical.checked.get(name)
    flat = torch.arange(numerical.values[name].numel()) if mask is None else mask.reshape(-1).nonzero().reshape(-1)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64).reshape(-1)[flat]

    n, e = pick(numerical.values[name]), pick(numerical.error[name])
    kink = numerical.kink[name].reshape(-1)[flat]
    lo = torch.minimum(pick(numerical.left[name]), pick(numerical.right[name]))
    hi = torch.maximum(pick(numerical.left[name]), pick(numerical.right[name]))
    a = None if autograd is None else pick(autograd)
    m = None if manual is None else pick(manual)
    def allowance(source: str) -> torch.Tensor:
        given = (noise or {}).get(source)
        return torch.zeros_like(n) if given is None or given.numel() != numerical.values[name].numel() else pick(given)

    rounding_a, rounding_m = allowance("autograd"), allowance("manual")
    rounding = torch.maximum(rounding_a, rounding_m)
    finite_n = n[torch.isfinite(n)]
    scale = float(finite_n.abs().max()) if finite_n.numel() else 0.0
    # Five function values cannot tell a kink from a smooth function's curvature within a step
    # (both move the one-sided derivatives apart, by the jump or by h³·f''''/16: near a minimum
    # or at log(w) for w = 0.01 the latter passes the numerical source's kink test). A "kink"
    # whose one-sided derivatives agree within the tolerance changes no comparison: it is none.
    kink = kink & ((hi - lo) > ERROR_BARS * e + tol.allowed(n, scale) + rounding)

    def against_reference(x: torch.Tensor, rounding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(agrees, |x − n| / allowed) for each element; a kink accepts its interval."""
        allowed = ERROR_BARS * e + tol.allowed(n, scale) + rounding
        diff = (x - n).abs()
        outside = torch.clamp(lo - x, min=0) + torch.clamp(x - hi, min=0)
        diff = torch.where(kink, outside, diff)
        ratio = diff / allowed.clamp(min=torch.finfo(torch.float64).tiny)
        return diff <= allowed, torch.nan_to_num(ratio, nan=torch.inf)

    if a is None:  # numpy case: no autograd, so nothing of it to disagree
        a_ok, a_ratio = torch.ones_like(n, dtype=torch.bool), torch.zeros_like(n)
    else:
        a_ok, a_ratio = against_reference(a, rounding_a)
    if m is None:
        m_ok, m_ratio = torch.ones_like(a_ok), torch.zeros_like(a_ratio)
        ma_ok, ma_ratio = m_ok, m_ratio
    elif a is None:
        m_ok, m_ratio = against_reference(m, rounding_m)
        ma_ok, ma_ratio = torch.ones_like(m_ok), torch.zeros_like(m_ratio)
    else:
        m_ok, m_ratio = against_reference(m, rounding_m)
        ma_allowed = 2 * tol.allowed(torch.maximum(m.abs(), a.abs()), scale) + rounding_a + rounding_m
        ma_diff = (m - a).abs()
        ma_ok = ma_diff <= ma_allowed
        ma_ratio = torch.nan_to_num(ma_diff / ma_allowed.clamp(min=torch.finfo(torch.float64).tiny), nan=torch.inf)

    bad = ~(a_ok & m_ok & ma_ok)
    culprit = _culprits(m_ok, a_ok, ma_ok, has_manual=m is not None)
    ratio = torch.maximum(torch.maximum(a_ratio, m_ratio), ma_ratio)
    # The element shown: a disagreeing one first, else one on a kink (what a nondifferentiable
    # verdict is about), else the closest call.
    rank = torch.where(bad, ratio + 1e300, torch.where(kink, ratio + 1e200, ratio))
    worst = int(torch.argmax(rank)) if ratio.numel() else 0
    counts: dict[str, int] = {}
    for who in ("manual", "autograd", "numerical", "unknown", "undecided"):
        count = int((bad & (culprit == _CODES[who])).sum())
        if count:
            counts[who] = count
    check = Check(
        name=name,
        kind=kind,
        shape=shape,
        verdict=MISMATCH if bool(bad.any()) else (NONDIFFERENTIABLE if bool(kink.any()) else OK),
        size=numerical.values[name].numel(),
        bad=int(bad.sum()),
        kinks=int(kink.sum()),
        culprits=counts,
    )
    if n.numel() == 0:
        return check
    check.index = unravel(int(flat[worst]), shape)
    if mask is not None:
        check.note = f"{n.numel()} of {check.size} elements checked one by one (the rest along random directions)"
    check.numerical = float(n[worst])
    check.error_bar = float(e[worst])
    check.autograd = None if a is None else float(a[worst])
    check.manual = None if m is None else float(m[worst])
    check.ratio = float(ratio[worst])
    odd = _name_of(int(culprit[worst])) if bad.any() else None
    check.culprit = _single(counts) if bad.any() else None
    shown = {"manual": check.manual, "autograd": check.autograd}.get(odd or "", None)
    if shown is None:  # ok, numerical or unknown: show the larger of the two deviations
        shown = check.autograd if m is None or (a is not None and float(a_ratio[worst]) >= float(m_ratio[worst])) else check.manual
    check.abs_err = abs(shown - check.numerical) if shown is not None else 0.0
    check.rel_err = check.abs_err / abs(check.numerical) if check.numerical else (float("inf") if check.abs_err else 0.0)
    check.allowed = float(ERROR_BARS * e[worst] + tol.allowed(n[worst : worst + 1], scale)[0] + rounding[worst])
    check.rounding = float(rounding[worst])
    if bool(kink[worst]):
        check.note = f"kink: left derivative {float(numerical.left[name].reshape(-1)[worst]):.6g}, right {float(numerical.right[name].reshape(-1)[worst]):.6g}"
    return check


def directions_agree(
    numerical: Gradients, name: str, sources: list[torch.Tensor], tol: Tolerance
) -> bool:
    """Whether every source's directional derivatives of `name` match the numerical ones."""
    return all(direction_agrees(d, sources, tol) for d in numerical.directions.get(name, []))


def direction_agrees(direction: Direction, sources: list[torch.Tensor], tol: Tolerance) -> bool:
    """Whether each source's derivative along `direction` matches the numerical one (a kink
    along it proves nothing, so it counts as a disagreement to look into)."""
    if direction.kink or not math.isfinite(direction.value):
        return False
    weights = direction.vector.abs()
    for gradient in sources:
        g = gradient.detach().to("cpu", torch.float64).reshape(direction.vector.shape)
        scale = float(g.abs().max()) if g.numel() else 0.0
        allowed = (
            ERROR_BARS * direction.error
            + tol.rtol * float((g.abs() * weights).sum())
            + (tol.atol * scale + tol.absolute) * float(weights.sum())
        )
        if not abs(direction.of(g) - direction.value) <= allowed:
            return False
    return True


_CODES = {"none": 0, "manual": 1, "autograd": 2, "numerical": 3, "unknown": 4, "undecided": 5}


def _name_of(code: int) -> str | None:
    return {v: k for k, v in _CODES.items()}[code] if code else None


def _culprits(m_ok: torch.Tensor, a_ok: torch.Tensor, ma_ok: torch.Tensor, *, has_manual: bool) -> torch.Tensor:
    """Per element, the source that disagrees with the other two (codes of `_CODES`)."""
    code = torch.full(m_ok.shape, _CODES["unknown"], dtype=torch.int64)
    code[m_ok & a_ok & ma_ok] = _CODES["none"]
    code[~m_ok & a_ok] = _CODES["manual"]
    code[m_ok & ~a_ok] = _CODES["autograd"]
    code[~m_ok & ~a_ok & ma_ok] = _CODES["numerical"]
    code[m_ok & a_ok & ~ma_ok] = _CODES["undecided"]
    if not has_manual:  # two-way: the float64 reference referees autograd alone
        code[~a_ok] = _CODES["autograd"]
    return code


def _single(counts: dict[str, int]) -> str | None:
    """The culprit when every disagreeing element names the same one, else None; elements the
    referee cannot decide name no one, and so do not contradict the others."""
    named = set(counts) - {"undecided"}
    return named.pop() if len(named) == 1 and "unknown" not in counts else None


def _manual_values(
    manual: Gradients | None,
    params: list[str],
    nodes: list[str],
    reference: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor | Check]:
    """The manual gradient per name, reshaped to the reference's shape. A wrong shape that a
    derivation explains (a transpose, a missing sum over the batch) becomes a mismatch; any other
    wrong shape, a missing parameter or an unknown name is a broken case."""
    if manual is None:
        return {}
    values = manual.values
    missing = [name for name in params if name not in values]
    if missing:
        raise CaseError(f"the manual gradient misses parameter {missing[0]!r}")
    unknown = sorted(set(values) - set(params) - set(nodes))
    if unknown:
        raise CaseError(f"the manual gradient returns {unknown[0]!r}, which is neither a parameter nor a node")
    aligned: dict[str, torch.Tensor | Check] = {}
    for name, value in values.items():
        want = tuple(reference[name].shape)
        got = tuple(value.shape)
        if value.numel() == reference[name].numel() and _squeezed(got) == _squeezed(want):
            aligned[name] = value.reshape(want)
            continue
        note = shape_note(value, reference[name])
        if note is None:
            raise CaseError(f"the manual gradient for {name!r} has shape {got}, expected {want}")
        aligned[name] = Check(
            name=name,
            kind="param" if name in params else "node",
            shape=want,
            verdict=MISMATCH,
            culprit="manual",
            bad=reference[name].numel(),
            size=reference[name].numel(),
            ratio=float("inf"),
            abs_err=float("inf"),
            rel_err=float("inf"),
            note=note,
            culprits={"manual": reference[name].numel()},
        )
    return aligned


def shape_note(value: torch.Tensor, reference: torch.Tensor) -> str | None:
    """Why a manual gradient of the wrong shape looks like a derivation slip, or None."""
    got, want = tuple(value.shape), tuple(reference.shape)
    ref = reference.to(torch.float64).cpu()
    val = value.to(torch.float64).cpu()
    atol = 1e-6 * (float(ref.abs().max()) if ref.numel() else 0.0) or 1e-6
    if len(got) == 2 and got == want[::-1]:
        fits = torch.allclose(val.T, ref, rtol=1e-3, atol=atol)
        return (
            f"manual gradient has shape {got}, the transpose of {want}"
            + ("; transposed, it matches the reference" if fits else "")
        )
    extra = len(got) - len(want)
    kept = [i for i, (g, w) in enumerate(zip(got, want)) if w == 1 and g > 1]
    if extra == 0 and kept and all(g == w or i in kept for i, (g, w) in enumerate(zip(got, want))):
        summed = val.sum(dim=tuple(kept), keepdim=True)  # a batch dimension the parameter keeps as 1
    elif extra > 0 and got[extra:] == want:
        summed = val.sum(dim=tuple(range(extra)))
    else:
        summed = None
    if summed is not None:
        fits = torch.allclose(summed, ref, rtol=1e-3, atol=atol)
        return (
            f"manual gradient has shape {got}, expected {want}: a missing sum over the batch dimension"
            + ("; summed over it, it matches the reference" if fits else "")
        )
    return None


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
