"""The run: load → plan (case × device × dtype × point) → three gradients → compare → Report."""
from __future__ import annotations

import signal
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .case import Case
from .compare import MISMATCH, NONDIFFERENTIABLE, OK, Check, compare, directions_agree, unravel
from .errors import CaseError, CaseTimeout, UsageError, one_line
from .forward import call_forward
from .graph import Graph, graph_of
from .hints import hints_for
from .loader import LoadFailure, load
from .points import Point, derive_seed, given_point, random_point
from .report import Report, Result
from .select import matches
from .sources import SOURCES, Gradients
from .tolerance import ERROR_BARS, Tolerance, tolerance_for

DEVICES = ("cpu", "cuda")
DTYPES = ("float64", "float32")
POINTS = 3
REDRAWS = 5
# Tensors larger than this are checked along random directions plus a sample of elements,
# and element by element only where those disagree (unless Plan.full).
SAMPLE_ABOVE = 2048
TIMEOUT = 300.0  # seconds per case: generous, so that only a hanging case meets it
# `expect` holds published numbers, often rounded to a few digits.
EXPECT_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}


@dataclass
class Plan:
    """What to check: the options shared by the CLI, the pytest plugin and the Python API."""

    devices: tuple[str, ...] = DEVICES
    dtypes: tuple[str, ...] = DTYPES
    points: int = POINTS
    seed: int = 0
    select: str | None = None
    timeout: float | None = TIMEOUT
    full: bool = False  # check every element of every tensor, however large

    def __post_init__(self) -> None:
        for dtype in self.dtypes:
            if dtype not in ("float64", "float32", "float16", "bfloat16"):
                raise UsageError(f"unknown dtype {dtype!r} (use float64, float32, float16 or bfloat16)")
        for device in self.devices:
            if device.split(":")[0] not in ("cpu", "cuda", "mps"):
                raise UsageError(f"unknown device {device!r} (use cpu or cuda)")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"--timeout must be positive, got {self.timeout}")
        if self.points < 0:
            raise UsageError(f"--points must be 0 or more, got {self.points}")
        if self.select is not None:
            matches(self.select, "")  # a -k expression that cannot be parsed fails before the run


def run(
    targets: str | Path | Case | Iterable[str | Path | Case],
    *,
    devices: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    points: int | None = None,
    seed: int = 0,
    select: str | None = None,
    timeout: float | None = TIMEOUT,
    full: bool = False,
) -> Report:
    """Check every case in `targets` (case files, folders or `Case` objects) and return a Report."""
    if isinstance(targets, (str, Path, Case)):
        targets = [targets]
    plan = Plan(
        devices=tuple(devices or DEVICES),
        dtypes=tuple(dtypes or DTYPES),
        points=POINTS if points is None else points,
        seed=seed,
        select=select,
        timeout=timeout,
        full=full,
    )
    return run_plan(list(targets), plan)


def run_plan(targets: list[str | Path | Case], plan: Plan) -> Report:
    started = time.perf_counter()
    cases, failures = load(targets)
    report = Report()
    report.results.extend(load_error(failure) for failure in failures)
    for case in cases:
        if plan.select is None or matches(plan.select, case.name):
            report.results.extend(check_case(case, plan))
    report.seconds = time.perf_counter() - started
    return report


def load_error(failure: LoadFailure) -> Result:
    return Result(
        case=failure.case or Path(failure.file).stem,
        device="-",
        dtype="-",
        verdict="error",
        message=f"{failure.where}: {failure.reason}",
        file=failure.file,
        line=failure.line,
    )


def check_case(case: Case, plan: Plan) -> list[Result]:
    """Every device × dtype result for one case."""
    started = time.perf_counter()
    combinations = [(device, dtype) for device in plan.devices for dtype in plan.dtypes]
    results: list[Result] = []
    with time_limit(plan.timeout):
        try:
            problem = case.problem()
            if problem:
                raise CaseError(problem)
            points, numerical_cache, notes = prepare_points(case, plan)
            for device, dtype_name in combinations:
                unavailable = device_unavailable(device)
                if unavailable:
                    results.append(_result(case, device, dtype_name, "skipped", message=unavailable))
                    continue
                result = check_combination(case, points, device, dtype_name, numerical_cache, plan)
                result.notes.extend(notes)
                results.append(result)
        except CaseError as exc:  # the case is broken (or out of time) for what is left to check
            results.extend(_error(case, d, t, str(exc), exc) for d, t in combinations[len(results) :])
        except Exception as exc:  # noqa: BLE001 - a bug here must not hide the other cases
            reason = f"internal error of backprop_check: {one_line(exc)} (--traceback shows where; please report it)"
            results.extend(_error(case, d, t, reason, exc) for d, t in combinations[len(results) :])
    elapsed = time.perf_counter() - started
    for result in results:
        result.seconds = elapsed / max(1, len(results))
    return results


def numerical_for(case: Case, point: Point, dtype: torch.dtype, plan: Plan) -> Gradients:
    sample_above = None if plan.full else SAMPLE_ABOVE
    return SOURCES["numerical"](case, point, "cpu", dtype, sample_above=sample_above, seed=plan.seed)


def sampled_suspects(
    checks: list[Check], numerical: Gradients, autograd: Gradients, manual: Gradients | None, tol
) -> list[str]:  # noqa: ANN001
    """Sampled tensors whose sample or directional derivatives disagree."""
    suspects = []
    for name in numerical.checked:
        check = next((c for c in checks if c.name == name), None)
        sources = [autograd.values[name]]
        if manual is not None and name in manual.values and manual.values[name].shape == autograd.values[name].shape:
            sources.append(manual.values[name])
        if (check is not None and check.verdict != OK) or not directions_agree(numerical, name, sources, tol):
            suspects.append(name)
    return suspects


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CaseTimeout in the block after `seconds` (main thread, where SIGALRM exists)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"the case ran past its time limit of {seconds:g}s (--timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def device_unavailable(device: str) -> str | None:
    """Why `device` cannot be used here, or None."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available"
    return None


def prepare_points(case: Case, plan: Plan) -> tuple[list[Point], dict[tuple[str, str], Gradients], list[str]]:
    """The given point and the random ones; a random point on a kink is redrawn."""
    given = given_point(case, plan.seed)
    notes = _empty_parameters(given)
    check_forward_is_pure(case, given)
    points = [given]
    cache: dict[tuple[str, str], Gradients] = {}
    for index in range(1, plan.points + 1):
        for attempt in range(REDRAWS):
            try:
                point = random_point(case, given, index, plan.seed, attempt)
                numerical = numerical_for(case, point, torch.float64, plan)
            except CaseTimeout:
                raise
            except CaseError as exc:
                raise CaseError(f"{exc} (at the random point {index})" if "point" not in str(exc) else str(exc)) from exc
            _require_finite_loss(numerical.loss, point)
            _require_finite_gradient(numerical, point)
            if not any(bool(mask.any()) for mask in numerical.kink.values()):
                break
        else:
            notes.append(f"{point.describe()} still sits on a kink after {REDRAWS} draws")
        points.append(point)
        cache[(point.label, "float64")] = numerical
    return points, cache, notes


def _empty_parameters(given: Point) -> list[str]:
    """Notes on parameters with no elements; a case whose every parameter is empty checks
    nothing, and an `ok` for it would be a lie."""
    empty = [f"{name!r} has shape {tuple(value.shape)}" for name, value in given.params.items() if value.numel() == 0]
    if empty and len(empty) == len(given.params):
        raise CaseError(f"every parameter is empty ({', '.join(empty)}): there is no gradient to check")
    return [f"parameter {text}: it has no elements to check" for text in empty]


def check_forward_is_pure(case: Case, point: Point) -> None:
    """The forward pass must be deterministic and leave its inputs alone."""
    params = {k: v.clone() for k, v in point.params.items()}
    data = {k: v.clone() for k, v in point.data.items()}
    with torch.no_grad():
        first, _ = call_forward(case, params, data)
        second, _ = call_forward(case, {k: v.clone() for k, v in point.params.items()}, data)
    for name, value in {**params, **data}.items():
        original = point.params.get(name, point.data.get(name))
        if not torch.equal(value, original):
            raise CaseError(f"the forward pass changes {name!r} in place; it must not modify its inputs")
    _require_finite_loss(first, point)
    if not torch.equal(first, second):
        raise CaseError(
            f"the forward pass is not deterministic: two runs at the same point gave {float(first):.17g} "
            f"and {float(second):.17g} (dropout or unseeded randomness?)"
        )


class NonFiniteLoss(CaseError):
    """The loss is NaN or infinite at a point."""


def _require_finite_loss(loss: torch.Tensor | None, point: Point) -> None:
    if loss is not None and not bool(torch.isfinite(loss)):
        hint = "" if point.seed is None else "; constrain random points with sample="
        raise NonFiniteLoss(f"the loss is {float(loss)} at the {point.describe()}{hint}")


def _require_finite_gradient(numerical: Gradients, point: Point) -> None:
    """The float64 referee must be finite wherever it was estimated; a NaN or Inf there means
    the loss is not finite a finite-difference step away (the edge of its domain), and no
    gradient at this point can be checked."""
    for name, value in numerical.values.items():
        bad = ~torch.isfinite(value)
        if name in numerical.checked:
            bad &= numerical.checked[name]
        if bool(bad.any()):
            index = unravel(int(bad.reshape(-1).nonzero()[0, 0]), tuple(bad.shape))
            label = f"{name}[{', '.join(map(str, index))}]" if index else name
            hint = "move the given point" if point.seed is None else "constrain random points with sample="
            raise CaseError(
                f"the numerical gradient of {label} is {float(value[index])} at the {point.describe()}: "
                f"the loss is not finite a small step away from it (the edge of its domain, like sqrt or log at 0?); {hint}"
            )


@dataclass
class Outcome:
    point: Point
    checks: list[Check]
    verdict: str
    culprit: str | None
    notes: list[str] = field(default_factory=list)
    # For a mismatch: the three sources' whole tensors (hints look for patterns in them) and
    # the graph between the named nodes (where in the chain rule the derivation slipped).
    gradients: dict[str, Gradients | None] = field(default_factory=dict)
    graph: Graph | None = None


def check_combination(
    case: Case,
    points: list[Point],
    device: str,
    dtype_name: str,
    cache: dict[tuple[str, str], Gradients],
    plan: Plan,
) -> Result:
    """Check one case on one device in one dtype at every point."""
    dtype = getattr(torch, dtype_name)
    tol = tolerance_for(dtype, case.rtol, case.atol)
    outcomes: list[Outcome] = []
    notes: list[str] = []
    reference = None
    try:
        for point in points:
            key = (point.label, dtype_name)
            if key not in cache:
                cache[key] = numerical_for(case, point, dtype, plan)
            numerical = cache[key]
            _require_finite_loss(numerical.loss, point)
            _require_finite_gradient(numerical, point)
            checked = check_point(case, point, device, dtype, numerical, tol)
            checks, autograd = checked.checks, checked.gradients["autograd"]
            if point.seed is None:
                checks.extend(expect_checks(case, numerical, autograd, dtype, tol))
                reference = {
                    "loss": float(autograd.loss),
                    "gradients": {k: autograd.values[k].cpu().double().tolist() for k in point.params},
                }
            if numerical.note and numerical.note not in notes:
                notes.append(numerical.note)
            outcomes.append(outcome_of(point, checks, checked.gradients, case))
    except CaseTimeout:
        raise
    except CaseError as exc:
        at = f" (at the {point.describe()})" if "point" not in str(exc) else ""
        return _error(case, device, dtype_name, f"{exc}{at}", exc)
    result = summarize(case, device, dtype_name, outcomes, tol.describe())
    result.notes.extend(notes)
    result.reference = reference
    return result


@dataclass
class PointCheck:
    """The checks at one point and the gradients they came from."""

    checks: list[Check]
    gradients: dict[str, Gradients | None]


def check_point(
    case: Case, point: Point, device: str, dtype: torch.dtype, numerical: Gradients, tol: Tolerance
) -> PointCheck:
    """Compute manual and autograd at `point` and compare them with the numerical reference.

    A sampled tensor that disagrees is estimated again in full, so the report names its element.
    Below float64, the tolerance also allows for the dtype's rounding at this very point.
    """
    autograd = SOURCES["autograd"](case, point, device, dtype)
    _require_finite_loss(autograd.loss, point)
    manual = SOURCES["manual"](case, point, device, dtype) if case.manual_fn else None
    clash = set(numerical.nodes) & set(point.params)
    if clash:
        raise CaseError(f"node {sorted(clash)[0]!r} has the name of a parameter")
    params = list(point.params)
    noise = rounding_noise(case, point, dtype) if dtype != torch.float64 else None
    checks = compare(numerical, autograd, manual, params, tol, noise)
    suspects = sampled_suspects(checks, numerical, autograd, manual, tol)
    if suspects:
        numerical.merge(SOURCES["numerical"](case, point, "cpu", dtype, only=suspects))
        checks = compare(numerical, autograd, manual, params, tol, noise)
    if device != "cpu":
        on_cpu = SOURCES["autograd"](case, point, "cpu", dtype)
        checks.extend(device_checks(autograd, on_cpu, params, device, tol))
    return PointCheck(checks, {"manual": manual, "numerical": numerical, "autograd": autograd})


def rounding_noise(case: Case, point: Point, dtype: torch.dtype, pairs: int = 2) -> dict[str, torch.Tensor]:
    """How much rounding to `dtype` can move each gradient element at this point.

    Every float input is nudged by one `dtype` ulp, with random signs, both ways (+δ and −δ),
    and the float64 autograd gradient taken again: half the difference is the gradient's
    sensitivity to `dtype` rounding. Near a minimum, where a gradient is a small difference of
    large terms (s = 3w − 6 at w ≈ 2), it is large, and a fixed rtol would call honest float32
    arithmetic a mismatch. Real sensitivity is smooth, so the two nudges move the gradient by
    opposite amounts; an element whose moves are not opposite jumps (a bug that depends on
    rounding, such as an argmax among ties) and earns no allowance."""
    at = point.rounded(dtype)
    base = SOURCES["autograd"](case, at, "cpu", torch.float64).values
    gen = torch.Generator().manual_seed(derive_seed("rounding", case.name, point.label))
    spread = {name: torch.zeros_like(value) for name, value in base.items()}
    for _ in range(pairs):
        steps = {name: _ulp_step(value, dtype, gen) for name, value in {**at.params, **at.data}.items()}
        moved = []
        for sign in (1.0, -1.0):
            nudged = Point(
                at.label,
                at.seed,
                {k: v + sign * steps[k] for k, v in at.params.items()},
                {k: v + sign * steps[k] if v.is_floating_point() else v for k, v in at.data.items()},
            )
            moved.append(SOURCES["autograd"](case, nudged, "cpu", torch.float64).values)
        for name, g0 in base.items():
            up, down = moved[0].get(name), moved[1].get(name)
            if up is None or down is None or up.shape != g0.shape or down.shape != g0.shape:
                continue
            odd, even = (up - down).abs() / 2, (up + down - 2 * g0).abs()
            smooth = even <= odd / 2
            spread[name] = torch.maximum(spread[name], torch.where(smooth, odd, torch.zeros_like(odd)))
    return spread


def _ulp_step(value: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """One `dtype` ulp per float element, with a random sign (zero for integer data)."""
    if not value.is_floating_point():
        return torch.zeros(())
    low = value.to(dtype)
    ulp = (torch.nextafter(low, torch.full_like(low, torch.inf)) - low).to(torch.float64)
    return ulp * (torch.randint(0, 2, value.shape, generator=gen, dtype=torch.float64) * 2 - 1)


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
        check = Check(name=f"{name} ({device} vs cpu)", kind="device", shape=tuple(autograd.values[name].shape),
                      verdict=MISMATCH if bool(bad.any()) else OK, size=diff.numel(), bad=int(bad.sum()))
        if diff.numel():
            check.autograd, check.numerical = float(here[worst]), float(there[worst])
            check.abs_err, check.allowed = float(diff[worst]), float(allowed[worst])
            check.ratio = float(diff[worst] / allowed[worst]) if bool(torch.isfinite(diff[worst])) else float("inf")
        if bad.any():
            check.culprit, check.culprits = "autograd", {"autograd": int(bad.sum())}
            check.note = f"autograd on {device} gives {check.autograd:.8g}, on the cpu {check.numerical:.8g}"
        checks.append(check)
    return checks


def expect_checks(
    case: Case, numerical: Gradients, autograd: Gradients, dtype: torch.dtype, tol
) -> list[Check]:  # noqa: ANN001
    """The case's published values against the loss and the numerical gradient."""
    from .points import as_float

    checks = []
    rtol = EXPECT_RTOL.get(dtype, 1e-3)
    for name, value in case.expect.items():
        try:
            expected = as_float(name, value)
        except CaseError as exc:
            raise CaseError(f"expect= for {name!r}: {exc}") from None
        if name == "loss":
            got, bar = autograd.loss.to(torch.float64).reshape(1), torch.zeros(1, dtype=torch.float64)
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
            kind="expect",
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
            check.note = f"expected {name} = {float(expected[worst]):.8g}, the case gives {float(got[worst]):.8g}"
        checks.append(check)
    return checks


def outcome_of(
    point: Point, checks: list[Check], gradients: dict[str, Gradients | None] | None = None, case: Case | None = None
) -> Outcome:
    """The verdict at one point; a mismatch keeps the gradients and the graph for the hints."""
    outcome = _verdict_of(point, checks)
    if outcome.verdict == MISMATCH:
        outcome.gradients = dict(gradients or {})
        try:
            outcome.graph = graph_of(case, point) if case is not None else None
        except CaseTimeout:
            raise
        except CaseError:  # the graph only sharpens the message; the mismatch stands without it
            outcome.graph = None
    return outcome


def _verdict_of(point: Point, checks: list[Check]) -> Outcome:
    bad = [check for check in checks if check.verdict == MISMATCH]
    if bad:
        named = {check.culprit for check in bad if check.kind == "param"} or {check.culprit for check in bad}
        culprit = named.pop() if len(named) == 1 else None
        return Outcome(point, checks, MISMATCH, culprit)
    if any(check.verdict == NONDIFFERENTIABLE for check in checks):
        return Outcome(point, checks, NONDIFFERENTIABLE, None)
    return Outcome(point, checks, OK, None)


def _undecided(outcome: Outcome) -> bool:
    """Whether every disagreement at this point is one the float64 referee cannot decide."""
    bad = [check for check in outcome.checks if check.verdict == MISMATCH]
    return bool(bad) and all(check.culprits and set(check.culprits) == {"undecided"} for check in bad)


def summarize(case: Case, device: str, dtype: str, outcomes: list[Outcome], tolerance: str) -> Result:
    """One result from the outcomes at every point: the worst point speaks for the rest."""
    failing = [o for o in outcomes if o.verdict == MISMATCH]
    kinked = [o for o in outcomes if o.verdict == NONDIFFERENTIABLE]
    if failing:
        # A point where the referee could not tell manual from autograd blames no one: it must
        # not veto the culprit that the other points name.
        decided = [o for o in failing if not _undecided(o)] or failing
        shown = decided[0]
        culprits = {o.culprit for o in decided}
        culprit = culprits.pop() if len(culprits) == 1 else None
        verdict = MISMATCH
    elif kinked:
        shown, culprit, verdict = kinked[0], None, NONDIFFERENTIABLE
    else:
        shown = max(outcomes, key=lambda o: max((c.ratio for c in o.checks), default=0.0))
        culprit, verdict = None, OK
    result = _result(case, device, dtype, verdict, culprit=culprit)
    result.point, result.seed = shown.point.describe(), shown.point.seed
    result.checks = shown.checks
    result.points = len(outcomes)
    result.first_bad_node = first_bad_node(shown.checks, culprit) if verdict == MISMATCH else None
    result.hints = hints_for(shown, outcomes) if verdict == MISMATCH else []
    result.message = describe(result, shown, len(failing), len(outcomes), tolerance)
    return result


def first_bad_node(checks: list[Check], culprit: str | None) -> str | None:
    """Walking from the loss toward the parameters, the first node whose gradient is wrong."""
    for check in checks:
        if check.kind == "node" and check.verdict == MISMATCH and (culprit is None or check.culprit == culprit):
            return check.name
    return None


def where_it_slips(result: Result, shown: Outcome) -> str:
    """The step of the chain rule that went wrong: between the first wrong node (or a wrong
    parameter) and the nearest node after it, toward the loss, whose gradient agrees."""
    graph, culprit = shown.graph, result.culprit
    if culprit not in ("manual", "autograd") or graph is None:
        return f"; the derivation first goes wrong at node {result.first_bad_node!r}" if result.first_bad_node else ""
    given = [c for c in shown.checks if c.kind == "node" and (culprit == "autograd" or c.manual is not None)]
    good = [c.name for c in given if c.verdict != MISMATCH]
    if result.first_bad_node:
        bad = result.first_bad_node
        after = graph.nearest(bad, good)
        text = f"; the derivation first goes wrong at node {bad!r}"
        if after:
            step = " or ".join(f"d{name}/d{bad}" for name in after)
            return f"{text}: dloss/d{after[0]} agrees, dloss/d{bad} does not, so the slip is in the step {step}"
        if graph.consumers(bad) == [graph.root]:
            return f"{text}, in the first step back from the loss (d{graph.root}/d{bad})"
        return text
    wrong = [c.name for c in shown.checks if c.kind == "param" and c.verdict == MISMATCH and c.culprit == culprit]
    steps = []
    for param in wrong:
        parts = [f"between node {name!r} and parameter {param!r} (d{name}/d{param})" for name in graph.nearest(param, good)]
        if parts and graph.bypasses(param, good):  # e.g. a penalty term: w reaches the loss directly
            parts.append(f"on a path from {param!r} to the loss that passes none of these nodes")
        steps.append(" or ".join(parts))
    if not given or not steps or not all(steps) or len(good) < len(given):
        return ""
    return (
        f"; every node the {culprit} gradient gives agrees ({', '.join(c.name for c in given)}), "
        f"so the slip is in the last step, {' and '.join(steps)}"
    )


def describe(result: Result, shown: Outcome, failing: int, total: int, tolerance: str) -> str:
    """The result in one or two sentences: which source, which element, how far off."""
    if result.verdict == OK:
        worst = max(shown.checks, key=lambda c: c.ratio, default=None)
        return "" if worst is None else f"all agree; closest call {worst.label} at {worst.ratio:.2g}× its tolerance ({tolerance})"
    if result.verdict == NONDIFFERENTIABLE:
        kinks = [c for c in shown.checks if c.kinks]
        names = ", ".join(f"{c.label} ({c.note})" for c in kinks[:3])
        return f"no single gradient exists at the {shown.point.describe()}: {names}; the sources agree within the subgradient interval"
    bad = [c for c in shown.checks if c.verdict == MISMATCH]
    params = [c for c in bad if c.kind != "node"] or bad
    check = params[0]
    who = f"{result.culprit} is the odd one out" if result.culprit else "the sources disagree and no single one is the odd one out"
    if check.kind in ("expect", "device"):
        text = f"{check.note}" + (" at the given point" if check.kind == "expect" else "")
    elif check.index is None:
        text = f"{check.name}: {check.note}"
    else:
        values = [f"numerical {check.numerical:.8g} ± {check.error_bar:.2g}"]
        if check.manual is not None:
            values.insert(0, f"manual {check.manual:.8g}")
        values.append(f"autograd {check.autograd:.8g}")
        text = (
            f"dloss/d{check.label}: {', '.join(values)}; error {check.abs_err:.3g} "
            f"(rel {check.rel_err:.3g}), {check.ratio:.3g}× the tolerance {check.allowed:.3g} ({tolerance})"
        )
        if check.bad > 1:
            text += f"; {check.bad} of {check.size} elements disagree"
    where = f" at the {shown.point.describe()}"
    others = f"; {failing} of {total} points disagree" if total > 1 else ""
    return f"{who}{where}: {text}{others}{where_it_slips(result, shown)}"


def _result(case: Case, device: str, dtype: str, verdict: str, **fields) -> Result:  # noqa: ANN003
    return Result(case=case.name, device=device, dtype=dtype, verdict=verdict, file=case.file, line=case.line, **fields)


def _error(case: Case, device: str, dtype: str, reason: str, exc: BaseException | None = None) -> Result:
    cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
    trace = "".join(traceback.format_exception(cause)) if cause is not None else None
    return _result(case, device, dtype, "error", message=f"{case.where}: {case.name}: {reason}", traceback=trace)
