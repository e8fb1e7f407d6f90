"""Forward mode (`modes=("fwd",)`): forward-mode AD against directional finite differences.

For a direction u over the differentiated inputs, forward-mode AD (`torch.autograd.forward_ad`,
which runs a custom Function's `jvp`) gives J·u for every output in one pass; float64 finite
differences of the outputs along u give it too, with an error bar per output element
(`numerical.along`: the step chosen as for the directions of reverse mode). Small
inputs (at most `ELEMENTWISE` elements in all) are checked along every basis direction, which
names the input element (∂output[i]/∂x[j]); larger ones along `DIRECTIONS` random directions,
and a direction that disagrees is bisected down to the input elements behind it.

The referee is the float64 difference. Below float64, the jvp's float64 twin (the same code at
the same rounded point) is held to float64's tolerance and the run dtype's jvp to its twin by the
dtype's rounding, as in reverse mode. A jvp that disagrees is a mismatch with culprit autograd
in a result of mode "fwd". For the derivative of order 2 (orders.py), the outputs are the
gradient itself, so this is forward over reverse.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.autograd.forward_ad as fwAD

from backprop_check.engine.verdict import error_result, outcome_of, summarize
from backprop_check.engine import rounding
from backprop_check.engine.tolerance import ERROR_BARS, Tolerance, tolerance_for
from backprop_check import dtypes
from backprop_check.errors import CaseError, CaseTimeout, one_line, raised_at
from backprop_check.model import forward
from backprop_check.engine.guards import checked_given, finite_forward, random_in_domain
from backprop_check.model.points import Point, derive_seed, generator
from backprop_check.model.case import Case
from backprop_check.options import Plan
from backprop_check.records import Check, CheckKind, Culprit, Outcome, Result, Verdict, complex_label, unravel
from backprop_check.sources import numerical
from backprop_check.sources.stencil import steps_for

ELEMENTWISE = 30  # inputs with at most this many elements in all: every basis direction
DIRECTIONS = 4  # random directions otherwise
LEAF = 8  # a bisection stops at this many input elements
MODE = "fwd"


@dataclass(frozen=True)
class Tangent:
    """A direction over the differentiated inputs, and how to name it: `element` is
    (input, flat index) for a basis direction, whose derivative is divided by its `step`."""

    vectors: dict[str, torch.Tensor]
    element: tuple[str, int] | None = None
    step: float = 1.0

    def label(self, shapes: Mapping[str, tuple[int, ...]], complex_names: frozenset[str] = frozenset()) -> str:
        if self.element is None:
            return "along a random direction u"
        name, flat = self.element
        return f"∂/∂{_element(name, unravel(flat, shapes[name]), name in complex_names)}"


def name_of(case: Case) -> str:
    """What forward mode's results of `case` are called: `f (fwd)`, `f (order 2, fwd)`."""
    root = getattr(case, "root", case)
    return f"{root.name} (order {case.level}, fwd)" if case.level > 1 else f"{case.name} (fwd)"


def named(result: Result, case: Case) -> Result:
    """The result as forward mode's (`name_of`)."""
    result.case, result.mode = name_of(case), MODE
    return result


def prepare_points(case: Case, plan: Plan) -> tuple[list[Point], list[str]]:
    """The given point, past the same guards as reverse mode's, and `plan.points` random ones
    (a kink is found per direction here)."""
    given, notes = checked_given(case, plan.seed)
    points = [given]
    for index in range(1, plan.points + 1):
        point, _, note = random_in_domain(case, given, index, plan.seed, 0, lambda p: finite_forward(case, p))
        points.append(point)
        if note and note not in notes:
            notes.append(note)
    return points, notes


def check_combination(case: Case, points: list[Point], device: str, dtype_name: str, *, plan: Plan) -> Result:
    """Forward mode on one device in one dtype at every point."""
    dtype = getattr(torch, dtype_name)
    tol = tolerance_for(dtype, case.rtol, case.atol)
    outcomes: list[Outcome] = []
    point = points[0]
    try:
        for k, point in enumerate(points, 1):
            if plan.progress:
                plan.progress(f"{case.name} (fwd)", device, dtype_name, k, len(points))
            outcomes.append(outcome_of(point, check_point(case, point, device, dtype, tol, plan.seed)))
    except CaseTimeout as exc:
        if exc.checks:  # a time limit while locating the elements behind a wrong direction
            outcomes.append(outcome_of(point, exc.checks))
        if any(o.verdict == Verdict.MISMATCH for o in outcomes):  # what was found stands, as in reverse mode
            result = summarize(case, device, dtype_name, outcomes, tol.describe())
            result.notes.append(f"{exc}: the check stopped there; the mismatch found before stands")
            exc.partial = result
        raise
    except CaseError as exc:
        return error_result(case, device, dtype_name, str(exc.at(point.describe())), exc, name_of(case))
    result = summarize(case, device, dtype_name, outcomes, tol.describe())
    if result.verdict == Verdict.OK and not any(o.checks for o in outcomes):
        result.message = "every output is empty: forward mode has no jvp element to compare (torch's gradcheck passes it too)"
    return result


def check_point(case: Case, point: Point, device: str, dtype: torch.dtype, tol: Tolerance, seed: int = 0) -> list[Check]:
    """One check per output at `point`: the worst disagreement over every direction."""
    rounded = point.rounded(dtype)
    shapes = {k: tuple(v.shape) for k, v in point.params.items()}
    tangents = _tangents(rounded, seed)
    judge = _Judge(case, point, device, dtype, tol)
    names = case.output_names()
    found: list[_Finding] = []
    along = judge.surveyed(tangents)
    found.extend(judge.every(tangents, along))
    # A random direction that disagrees is judged again against the sum of its two halves'
    # estimates (`_Judge.halves`): its own estimate may be the one at fault.
    found = [judge.halves(f) if f.bad and f.tangent.element is None else f for f in found]
    found = [judge.rejudged(f) if f.bad else f for f in found]
    timed_out = None
    if any(f.bad for f in found):  # name the input elements behind a wrong random direction
        try:
            for finding in [f for f in found if f.bad and f.tangent.element is None][:1]:
                found.extend(judge.bisect(finding))
        except CaseTimeout as exc:  # the disagreement is judged already: it stands, unlocated
            timed_out = exc
    checks = []
    for k, name in enumerate(names):
        mine = [f for f in found if f.output == k]
        if any(f.worst.numel() for f in mine):  # an empty output has no jvp element to compare
            checks.append(_check(name, mine, shapes, dtype, tol, point.complex, judge.complex[k]))
    if timed_out is not None:
        timed_out.checks = checks  # what check_combination reports as the partial result
        raise timed_out
    return checks


def _tangents(point: Point, seed: int) -> list[Tangent]:
    """Every basis direction for small inputs; else, per input tensor, DIRECTIONS random-sign
    directions over that tensor alone (its basis directions where it has no more elements than
    that), the elements' steps (a power of two near RELATIVE_STEP·max(1, |θ|)) as their lengths.
    One tensor at a time: a tensor whose move makes the output jump (a ±1 label that requires
    grad) makes every direction through it a kink, and must not hide a slip along the others."""
    steps = {k: steps_for(v.reshape(-1)) for k, v in point.params.items()}
    # A non-finite element (the -inf of an attention mask) is held fixed, as in reverse mode:
    # no step moves it, so no tangent does.
    moves = {k: torch.isfinite(v.reshape(-1)) if v.is_floating_point() else torch.ones(v.numel(), dtype=torch.bool)
             for k, v in point.params.items()}
    total = sum(s.numel() for s in steps.values())

    def basis(name: str) -> list[Tangent]:
        # Every other element's direction points down (the first's too): a jvp is linear in its
        # tangent, and one that is not (|t| for t) agrees along every +e_j.
        found = []
        for j in range(steps[name].numel()):
            if moves[name][j]:
                step = -steps[name][j] if j % 2 == 0 else steps[name][j]
                vectors = _zeros(point.params)
                vectors[name].view(-1)[j] = step
                found.append(Tangent(vectors, (name, j), float(step)))
        return found

    if total <= ELEMENTWISE:
        return [tangent for name in steps for tangent in basis(name)]
    gen = generator(derive_seed(seed, point.label, "jvp"))
    tangents = []
    for name, step in steps.items():
        if step.numel() <= DIRECTIONS:
            tangents.extend(basis(name))
            continue
        for _ in range(DIRECTIONS):
            vectors = _zeros(point.params)
            signs = torch.randint(0, 2, step.shape, generator=gen, dtype=torch.float64) * 2 - 1
            vectors[name] = (signs * step * moves[name]).reshape(point.params[name].shape)
            tangents.append(Tangent(vectors))
    return tangents


@dataclass
class _Finding:
    """One output along one tangent: the sources and how far apart they are, per element."""

    output: int
    tangent: Tangent
    fwd: torch.Tensor  # the run dtype's jvp (a float64 copy)
    twin: torch.Tensor  # the same jvp in float64 at the same point (fwd itself in float64)
    numerical: torch.Tensor
    error: torch.Tensor
    allowed: torch.Tensor  # for the twin against the numerical referee
    ratio: torch.Tensor
    kink: torch.Tensor
    shape: tuple[int, ...]
    # Below float64: how far the run dtype's jvp is from its twin, against the dtype's rounding.
    run_ratio: torch.Tensor | None = None
    rounding: torch.Tensor | None = None
    # Where the run dtype's rounding of the twin's computation (`_Judge._stochastic`) covers an
    # element that was off: how far it moves the twin there, relative to it (0: nowhere).
    cancels: float = 0.0

    # Read many times over (check_point's passes, `_check`): computed once. A finding is never
    # changed once made (one judged again is a `replace`).
    @functools.cached_property
    def worst(self) -> torch.Tensor:
        return self.ratio if self.run_ratio is None else torch.maximum(self.ratio, self.run_ratio)

    @functools.cached_property
    def bad(self) -> int:
        return int((self.worst > 1).sum())


class _Judge:
    """Forward-mode AD and finite differences along tangents, at one point in one dtype."""

    def __init__(self, case: Case, point: Point, device: str, dtype: torch.dtype, tol: Tolerance) -> None:
        self.case, self.device, self.dtype, self.tol = case, device, dtype, tol
        self.run = point.cast(dtype, device)
        self.exact = point.rounded(dtype)  # where the run is, in float64, on the CPU
        with torch.no_grad():
            raw = forward.outputs(case, self.exact)
        self.complex = [isinstance(o, torch.Tensor) and o.is_complex() for o in raw]
        base = [_real(o.detach()) for o in raw]
        for name, value in zip(case.output_names(), base):
            if not bool(torch.isfinite(value).all()):
                hint = "" if point.seed is None else f"; {point.constrain_hint()}"
                error = CaseError(f"{name} is not finite at the {point.describe()}: no derivative of it can be checked{hint}")
                error.located = True  # the point is in the message already
                raise error
        self.f0 = [o.reshape(-1) for o in base]
        self.shapes = [tuple(o.shape) for o in base]
        # Per output, its largest derivative along any tangent, per unit of the tangent: the
        # scale atol is relative to, as reverse mode's is the gradient's largest element (a
        # basis direction that moves only outputs flat at the point must not judge by zero).
        self.scale = [0.0] * len(base)
        # Below float64, the point nudged by an ulp of the dtype both ways: how rounding-sized
        # changes move the jvp, as reverse mode measures its gradients (rounding.py).
        self.nudged = [] if dtype == torch.float64 else rounding.nudged_points(case, point, dtype)[1]
        self.batches = True  # whether torch.func batches the jvps (`jvps`), until it does not

    def __call__(self, tangent: Tangent, estimates: list[dict[str, torch.Tensor]] | None = None) -> list[_Finding]:
        """Every output along `tangent`, against the referee's `estimates` of it (`along`)."""
        if estimates is None:
            (estimates,) = self.along([tangent])
        return self.every([tangent], [estimates])

    def every(self, tangents: list[Tangent], estimates: list[list[dict[str, torch.Tensor]]]) -> list[_Finding]:
        """Every output along each tangent, against the referee's estimates of it (`along`): the
        jvps along all of them at once where vmap batches them (`jvps`)."""
        vectors = [t.vectors for t in tangents]
        fwds = self.jvps(self.run, vectors)
        twins = fwds if self.dtype == torch.float64 else self.jvps(self.exact, vectors)
        ups, downs = (self.jvps(p, vectors) for p in self.nudged) if self.nudged else (None, None)
        found = []
        for j, tangent in enumerate(tangents):
            for k, (f, t, est) in enumerate(zip(fwds[j], twins[j], estimates[j])):
                found.append(self._judged(k, tangent, f, t, est, None if ups is None else (ups[j][k], downs[j][k])))
        return found

    def jvps(self, at: Point, vectors: list[Mapping[str, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
        """`jvp` along each of `vectors` at `at`: the first and the last by plain forward-mode
        AD, all of them in one call of torch.func.jvp under vmap where that gives the same values
        at both ends (a custom Function's own vmap and jvp rules included: a wrong vmap rule must
        not be judged as its jvp), else one by one from then on. For a tiny check, each call's own
        cost is most of the work."""
        if len(vectors) < 3 or not self.batches:
            return [jvp(self.case, at, v) for v in vectors]
        ends = jvp(self.case, at, vectors[0]), jvp(self.case, at, vectors[-1])
        try:
            batched = _vmapped_jvps(self.case, at, vectors)
            if len(batched) == len(ends[0]) and all(
                _alike(b[0], a) and _alike(b[-1], z) for a, z, b in zip(*ends, batched)
            ):
                return [ends[0], *(tuple(b[j] for b in batched) for j in range(1, len(vectors) - 1)), ends[1]]
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - what torch.func cannot batch runs one by one
            pass
        self.batches = False
        return [ends[0], *(jvp(self.case, at, v) for v in vectors[1:-1]), ends[1]]

    def along(self, tangents: list[Tangent]) -> list[list[dict[str, torch.Tensor]]]:
        """Per tangent, per output, the float64 derivative along it (in its units), with error
        bars: the referee's own directional derivatives (`numerical.along_many`, every tangent
        in the same batches, the step chosen as in reverse mode)."""

        def outputs(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([o.reshape(-1).to(torch.float64) for o in _outputs(self.case, replace(self.exact, params=params))])

        found = []
        sizes = [f0.numel() for f0 in self.f0]
        for estimate in numerical.along_many(outputs, self.exact.params, [t.vectors for t in tangents], sizes):
            parts, start = [], 0
            for f0 in self.f0:
                part = slice(start, start + f0.numel())
                parts.append({k: getattr(estimate, k)[part] for k in ("value", "error", "left", "right", "kink")})
                start = part.stop
            found.append(parts)
        return found

    def surveyed(self, tangents: list[Tangent]) -> list[list[dict[str, torch.Tensor]]]:
        """`along` the point's own tangents, which set `scale`: per output, its largest
        derivative along any of them, per unit of the tangent (the halves and the bisection
        that follow are judged by it too)."""
        found = self.along(tangents)
        self.scale = [
            max((float(e[k]["value"].abs().nan_to_num(0.0).max()) / t.step if e[k]["value"].numel() else 0.0
                 for t, e in zip(tangents, found)), default=0.0)
            for k in range(len(self.f0))
        ]
        return found

    def _judged(
        self, k: int, tangent: Tangent, fwd: torch.Tensor, twin: torch.Tensor, est: dict[str, torch.Tensor],
        nudged: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> _Finding:
        fwd, twin = fwd.reshape(-1).double().cpu(), twin.reshape(-1).double().cpu()
        n, e = est["value"], est["error"]
        exact = self.tol.twin or self.tol
        largest = max(float(n.abs().nan_to_num(0.0).max()) if n.numel() else 0.0, self.scale[k] * tangent.step)
        allowed = ERROR_BARS * e + exact.rtol * n.abs() + exact.atol * largest + exact.floor(largest) + exact.absolute
        kink = est["kink"]
        low, high = torch.minimum(est["left"], est["right"]), torch.maximum(est["left"], est["right"])
        off = torch.where(kink, (low - twin).clamp(min=0) + (twin - high).clamp(min=0), (twin - n).abs())
        # NaN and Inf never agree: a non-finite jvp, or outputs not finite a step away, disagree
        ratio = torch.nan_to_num(off / allowed.clamp(min=1e-300), nan=math.inf)
        ratio = torch.where(torch.isfinite(n), ratio, torch.full_like(ratio, math.inf))
        budget, run_ratio, cancels = None, None, 0.0
        if self.dtype != torch.float64:  # the run dtype's jvp against its own float64 twin
            scale = float(twin.abs().max()) if twin.numel() else 0.0
            measured = torch.zeros_like(twin)
            if nudged is not None:  # the dtype's rounding measured at this point
                up, down = (_real(v.detach()).reshape(-1).double().cpu() for v in nudged)
                measured, _ = rounding.allowance(fwd, twin, up, down)
            budget = (
                2 * self.tol.rtol * torch.maximum(fwd.abs(), twin.abs())
                + self.tol.atol * scale + self.tol.floor(scale) + self.tol.absolute + self.tol.underflow
                + measured
            )
            run_ratio = torch.nan_to_num((fwd - twin).abs() / budget.clamp(min=1e-300), nan=math.inf)
            if nudged is not None and bool((run_ratio > 1).any()):  # the dtype's rounding of the twin's own computation
                spread = self._stochastic(k, tangent)
                if spread is not None:
                    budget = budget + rounding.STOCHASTIC_SPREAD * spread
                    wider = torch.nan_to_num((fwd - twin).abs() / budget.clamp(min=1e-300), nan=math.inf)
                    covered = (run_ratio > 1) & (wider <= 1)
                    if bool(covered.any()):
                        cancels = rounding.cancelled_share(spread, twin, covered)
                    run_ratio = wider
        return _Finding(k, tangent, fwd, twin, n, e, allowed, ratio, kink, self.shapes[k], run_ratio, budget, cancels)

    def _stochastic(self, k: int, tangent: Tangent) -> torch.Tensor | None:
        """How far the float64 twin of output k's jvp along `tangent` moves under the run dtype's
        rounding of every value it computes (`rounding.stochastic`), or None."""
        spread = rounding.stochastic(
            lambda: {"jvp": jvp(self.case, self.exact, tangent.vectors)[k].reshape(-1).double().cpu()},
            ["jvp"], torch.finfo(self.dtype).eps / 2,
            derive_seed("stochastic", self.case.name, self.exact.label, k, "jvp"),
        )
        return spread.get("jvp")

    def rejudged(self, finding: _Finding) -> _Finding:
        """In float64, where the jvp disagrees with the referee off a kink: float64's own rounding,
        judged as reverse mode judges a gradient whose formula cancels (`rounding.scattered`:
        erfcx's jvp at 1e6 keeps three digits). The jvp along the same tangent at more points a
        few ulps away; an element whose draws' mean agrees with the referee is allowed
        NUDGE_SPREAD times their scatter. Below float64 the same for the float64 twin (the jvp at
        the rounded point, in float64), which float64's tolerance judges."""
        open_ = (finding.ratio > 1) & ~finding.kink & torch.isfinite(finding.numerical) & torch.isfinite(finding.twin)
        if not bool(open_.any()):
            return finding
        gen = generator(derive_seed("rounding", self.case.name, self.exact.label, finding.output, "jvp"))
        judged = {"jvp": {"ref": finding.numerical, "bar": finding.error, "open": open_.clone(), "taken": torch.zeros_like(open_)}}
        draws = {"jvp": [finding.twin.clone()]}

        def draw() -> dict[str, torch.Tensor] | None:
            try:
                there = jvp(self.case, rounding.jittered(self.exact, gen), finding.tangent.vectors)[finding.output]
            except CaseTimeout:
                raise
            except CaseError:  # fn refuses a point a few ulps away: nothing is taken, the mismatch stands
                return None
            there = there.reshape(-1).double().cpu()
            return {"jvp": there} if there.shape == finding.twin.shape else None

        spreads = rounding.scattered(judged, draws, draw)
        taken = judged["jvp"]["taken"]
        if not bool(taken.any()):
            return finding
        allowed = finding.allowed.clone()
        allowed[taken] = allowed[taken] + rounding.NUDGE_SPREAD * spreads["jvp"][taken]
        ratio = finding.ratio.clone()
        ratio[taken] = (finding.twin[taken] - finding.numerical[taken]).abs() / allowed[taken].clamp(min=1e-300)
        return replace(finding, allowed=allowed, ratio=ratio)

    def halves(self, finding: _Finding) -> _Finding:
        """`finding` (a random direction u that disagrees) judged again with the referee's
        estimates along its two halves, summed, as the reference for J·u: J·u = J·u₁ + J·u₂,
        and autograd's jvp along u itself is what is judged, so a wrong jvp still disagrees.
        What this spares is the estimate along u where it alone is wrong: data on a lattice
        (sort of distinct integers), where at every dyadic step of a random direction another
        element lands where one left and the output reads as flat. The finding that judges the
        sum is kept where it agrees; the first one where it does not."""
        support = [(k, j) for k, v in finding.tangent.vectors.items() for j in torch.nonzero(v.reshape(-1)).flatten().tolist()]
        if len(support) < 2:
            return finding
        parts = [self._restricted(finding.tangent, support[: len(support) // 2]),
                 self._restricted(finding.tangent, support[len(support) // 2 :])]
        a, b = (estimates[finding.output] for estimates in self.along(parts))
        low = torch.minimum(a["left"], a["right"]) + torch.minimum(b["left"], b["right"])
        high = torch.maximum(a["left"], a["right"]) + torch.maximum(b["left"], b["right"])
        summed = {"value": a["value"] + b["value"], "error": a["error"] + b["error"], "left": low, "right": high,
                  "kink": a["kink"] | b["kink"]}
        again = self._judged(finding.output, finding.tangent, finding.fwd, finding.twin, summed)
        if again.ratio.isnan().any() or bool((again.ratio > 1).any()):
            return finding
        return replace(again, run_ratio=finding.run_ratio, rounding=finding.rounding, cancels=finding.cancels)

    def bisect(self, finding: _Finding) -> list[_Finding]:
        """The input elements behind a random direction that disagrees: halve its support while
        a half still disagrees at the same output, down to LEAF elements, then every basis
        direction there."""
        support = [(k, j) for k, v in finding.tangent.vectors.items() for j in torch.nonzero(v.reshape(-1)).flatten().tolist()]
        while len(support) > LEAF:
            half = support[: len(support) // 2]
            first = self._restricted(finding.tangent, half)
            if self(first)[finding.output].bad:
                support = half
            else:
                support = support[len(support) // 2 :]
        basis = []
        for name, j in support:
            step = float(finding.tangent.vectors[name].reshape(-1)[j])
            vectors = _zeros(finding.tangent.vectors)
            vectors[name].view(-1)[j] = abs(step)
            basis.append(Tangent(vectors, (name, j), abs(step)))
        return [f for tangent, estimates in zip(basis, self.along(basis)) for f in self(tangent, estimates)]

    @staticmethod
    def _restricted(tangent: Tangent, support: list[tuple[str, int]]) -> Tangent:
        vectors = _zeros(tangent.vectors)
        for name, j in support:
            vectors[name].view(-1)[j] = tangent.vectors[name].reshape(-1)[j]
        return Tangent(vectors)


def _zeros(like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero tangents of these shapes, each in contiguous storage of its own (`.view(-1)` of it
    is the tensor: a transposed input's zeros_like would keep its strides)."""
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in like.items()}


def _outputs(case: Case, at: Point) -> tuple[torch.Tensor, ...]:
    return tuple(_real(o.detach() if isinstance(o, torch.Tensor) else torch.as_tensor(o)) for o in forward.outputs(case, at))


def _real(tensor: torch.Tensor) -> torch.Tensor:
    """A complex output (or tangent) as its real view: its real and imaginary parts."""
    return torch.view_as_real(tensor.resolve_conj()) if tensor.is_complex() else tensor


def jvp(case: Case, at: Point, vectors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """J·u at `at` for every output of `case` by forward-mode AD (a custom Function's `jvp`)."""
    with fwAD.dual_level(), torch.enable_grad():
        duals = {}
        for name, value in at.params.items():
            tangent = vectors[name].to(device=value.device, dtype=value.dtype)
            # requires_grad: the derivative of order 2 differentiates inside (forward over reverse)
            duals[name] = fwAD.make_dual(value.detach().requires_grad_(True), tangent)
        try:
            outputs = forward.outputs(case, replace(at, params=duals))
        except CaseError as exc:
            raise CaseError(f"forward mode: {exc}") from exc.__cause__
        except Exception as exc:  # noqa: BLE001 - torch's RuntimeError, or anything a custom Function's jvp raises
            raise CaseError(f"forward-mode AD failed: {one_line(exc)}{raised_at(exc)}") from exc
        tangents = []
        for output in outputs:
            tangent = fwAD.unpack_dual(output).tangent
            tangents.append(torch.zeros_like(output) if tangent is None else tangent)
        return tuple(_real(t.detach()) for t in tangents)


def _vmapped_jvps(case: Case, at: Point, vectors: list[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Per output, the jvps along every one of `vectors` stacked (torch.func.jvp under vmap)."""
    names = list(at.params)
    primals = tuple(at.params[name].detach() for name in names)

    def outputs(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(forward.outputs(case, replace(at, params=dict(zip(names, values)))))

    def along(*tangents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.func.jvp(outputs, primals, tangents)[1]

    stacked = tuple(torch.stack([v[name].to(device=p.device, dtype=p.dtype) for v in vectors]) for name, p in zip(names, primals))
    return tuple(_real(t.detach()) for t in torch.func.vmap(along, randomness="error")(*stacked))


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same jvp up to its dtype's rounding (another kernel's order of sums)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    eps = torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
    a, b = a.double(), b.double()
    scale = float(b.abs().nan_to_num(0.0, posinf=0.0).max()) if b.numel() else 0.0
    close = (a - b).abs() <= 64 * eps * max(1.0, scale)
    return bool((close | (a == b) | (a.isnan() & b.isnan())).all())


def _check(
    name: str,
    found: list[_Finding],
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    tol: Tolerance,
    complex_inputs: frozenset[str] = frozenset(),
    complex_output: bool = False,
) -> Check:
    """One output's check: its worst element over every direction, said in the terms of the
    comparison it fails (the float64 jvp against the referee, or the run dtype's jvp against
    its float64 twin)."""
    worst = max(found, key=lambda f: float(f.worst.max()) if f.worst.numel() else 0.0)
    i = int(worst.worst.argmax()) if worst.worst.numel() else 0
    ratio = float(worst.worst[i]) if worst.worst.numel() else 0.0
    bad = sum(f.bad for f in found)
    kinks = sum(int(f.kink.sum()) for f in found)
    size = sum(int(f.worst.numel()) for f in found)
    unit = worst.tangent.step
    f, t = float(worst.fwd[i]) / unit, float(worst.twin[i]) / unit
    n, e = float(worst.numerical[i]) / unit, float(worst.error[i]) / unit
    index = unravel(i, worst.shape)
    where = _element(name, index, complex_output)
    along = worst.tangent.label(shapes, complex_inputs)
    dtype_name = dtypes.name_of(dtype)
    exact = tol.twin or tol
    if worst.run_ratio is not None and float(worst.run_ratio[i]) > float(worst.ratio[i]):
        allowed, reference = float(worst.rounding[i]) / unit, t  # type: ignore[index]
        compared = f"autograd (fwd) in {dtype_name} against its float64 twin"
        text = (
            f"autograd (fwd) {f:.8g} in {dtype_name}, {t:.8g} in float64 (numerical {n:.8g} ± {e:.2g}); the "
            f"{dtype_name} jvp is off by {abs(f - t):.3g}, {ratio:.3g}× the tolerance {allowed:.3g} ({tol.describe()})"
        )
    else:
        allowed, reference = float(worst.allowed[i]) / unit, n
        compared = "autograd (fwd) against numerical"
        shown = f"autograd (fwd) {t:.8g}" + (f" (in {dtype_name}: {f:.8g})" if dtype != torch.float64 else "")
        text = (
            f"numerical {n:.8g} ± {e:.2g}, {shown}; error {abs(t - n):.3g}, {ratio:.3g}× the tolerance "
            f"{allowed:.3g} ({exact.describe()}{', the float64 twin judged by float64' if dtype != torch.float64 else ''})"
        )
    verdict = Verdict.MISMATCH if bad else (Verdict.NONDIFFERENTIABLE if kinks else Verdict.OK)
    directions = len({id(g.tangent) for g in found})
    note = f"forward mode (jvp) {along} of {where}: {text}"
    if bad > 1:
        note += f"; {bad} of {size} derivatives disagree ({directions} directions × the output's elements)"
    cancels = max(f.cancels for f in found)
    if cancels:
        note += "; " + rounding.cancels_note(f"the {dtype_name} jvp, at some elements,", dtype, cancels)
    error = abs((f if reference == t and dtype != torch.float64 else t) - reference)
    return Check(
        name=f"jvp {name}",
        kind=CheckKind.JVP,
        shape=worst.shape,
        verdict=verdict,
        culprit=Culprit.AUTOGRAD if bad else None,
        index=index,
        numerical=n,
        autograd=f,
        error_bar=e,
        abs_err=error,
        rel_err=error / abs(reference) if reference else (math.inf if error else 0.0),
        allowed=allowed,
        ratio=ratio,
        bad=bad,
        kinks=kinks,
        size=size,
        note=note,
        compared=compared,
        # every output element, estimated numerically along each of the directions
        coverage={"elements": int(worst.worst.numel()), "numerical": int(worst.worst.numel()), "directions": directions},
        reference=t if dtype != torch.float64 else None,
    )


def _element(name: str, index: tuple[int, ...], complex_: bool) -> str:
    """`x[2, 0]`, or `z[2].imag` for an element of a complex tensor's real view."""
    if complex_:
        return complex_label(name, index)
    return f"{name}[{', '.join(map(str, index))}]" if index else name

