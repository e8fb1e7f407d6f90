"""The run: load → plan (case × device × dtype × point) → three gradients → compare → Report."""
from __future__ import annotations

import time
from contextlib import ExitStack
from functools import partial
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any
from pathlib import Path

import torch

from backprop_check.model.arrays import NUMPY_ON_CPU
from backprop_check.model.case import Case
from backprop_check.engine.orders import orders
from backprop_check.engine import jvp
from backprop_check.engine.compare import compare
from backprop_check.engine.directions import agreement, failing_directions
from backprop_check.engine.sides import Evidence, disputed
from backprop_check.records import MISMATCH, Check
from backprop_check.errors import CaseError, CaseTimeout, one_line
from backprop_check.model import complexes
from backprop_check.model.forward import call_forward
from backprop_check.engine import rounding
from backprop_check.dtypes import name_of
from backprop_check.engine import threads
from backprop_check.limits import time_limit
from backprop_check.model.loader import LoadFailure, inventory, load
from backprop_check.options import POINTS, TIMEOUT, Plan, devices_for, plan_from
from backprop_check.model.points import Point, given_point
from backprop_check.engine.guards import (
    checked_given, leaves_inputs_alone, random_in_domain, require_finite_gradient, require_finite_loss,
)
from backprop_check.engine.references import device_checks, expect_checks
from backprop_check.records import Interrupted, Report, Result
from backprop_check.engine.verdict import error_result, outcome_of, result_for, shown_already, summarize
from backprop_check.records import Outcome, Verdict
from backprop_check.selection import matches
from backprop_check.sources import RANDOM, SOURCES, Gradients
from backprop_check.engine import reference as kernels
from backprop_check.engine import outputs
from backprop_check.engine.distributed import DistributedCase
from backprop_check.model.function import FunctionCase, cast_notes
from backprop_check.sources.numerical import Reference, reference
from backprop_check.engine.tolerance import Tolerance, tolerance_for

REDRAWS = 5


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
    allow_skip: bool = False,
    allow_empty: bool = False,
) -> Report:
    """Check every case in `targets` (case files, folders or `Case` objects) and return a Report.

    Devices given by name must be available (else `exit_code` is 5) unless `allow_skip`; a run
    that checks nothing has `exit_code` 5 unless `allow_empty`. Ctrl-C raises `Interrupted`, a
    KeyboardInterrupt whose `report` holds the results computed so far."""
    if isinstance(targets, (str, Path, Case)):
        targets = [targets]
    given = {
        "device": devices, "dtype": dtypes, "points": POINTS if points is None else points, "seed": seed,
        "timeout": timeout, "full": full, "allow_skip": allow_skip,
    }
    plan = plan_from(given.__getitem__, select)  # as the CLI and the plugin make theirs
    report = run_plan(list(targets), plan)
    report.allow_empty = allow_empty
    return report


def run_plan(targets: list[str | Path | Case], plan: Plan) -> Report:
    """Run `plan` over `targets`; on Ctrl-C raise `Interrupted` with the results so far."""
    started = time.perf_counter()
    report = Report(strict_devices=plan.strict_devices, plan=plan)
    try:
        cases, failures = load(targets, timeout=plan.timeout)
        report.files = inventory(targets, cases, failures)
        report.results.extend(load_error(failure) for failure in failures)
        for case in cases:
            if plan.select is None or matches(plan.select, case.name):
                try:
                    for checked, mode in checks_of(case, plan):
                        report.results.extend(check_case(checked, plan, mode))
                finally:
                    case.close()
    except KeyboardInterrupt:
        report.partial = True
        report.seconds = time.perf_counter() - started
        raise Interrupted(report) from None
    report.seconds = time.perf_counter() - started
    return report


def checks_of(case: Case, plan: Plan) -> Iterator[tuple[Case, str]]:
    """(case, mode) for every check a case asks for: the case and, with `order=`, its
    derivatives (orders.py), each in the modes it asks for (`modes=`: "rev", "fwd"); a case that
    cannot be checked once, in reverse mode, whose result says why."""
    for checked in orders(case, plan.seed, plan.full):
        broken = checked.problem() is not None
        for mode in ("rev",) if broken else checked.modes:
            yield checked, mode


def load_error(failure: LoadFailure) -> Result:
    return Result(
        case=failure.case or Path(failure.file).stem,
        device="-",
        dtype="-",
        verdict=Verdict.ERROR,
        message=f"{failure.where}: {failure.reason}",
        file=failure.file,
        line=failure.line,
        traceback=failure.traceback,
    )


def check_case(case: Case, plan: Plan, mode: str = "rev") -> list[Result]:
    """Every device × dtype result for one case, in reverse mode (the gradient, with its
    backward) or forward mode ("fwd": jvp.py)."""
    started = time.perf_counter()
    case = case.prepared()
    # A kernel checked against its reference runs in its own dtypes (engine/reference.py).
    dtypes = kernels.run_dtypes(case) or plan.dtypes
    combinations = [(device, dtype) for device in devices_for(case, plan.devices) for dtype in dtypes]
    label = jvp.name_of(case) if mode == jvp.MODE else case.name
    results: list[Result] = []
    with time_limit(plan.timeout), ExitStack() as stack:
        try:
            problem = case.problem()
            if problem:
                raise CaseError(problem)
            stack.enter_context(threads.chosen(elements(given_point(case, plan.seed))))
            if mode == jvp.MODE:
                points, notes = jvp.prepare_points(case, plan)
                combination = partial(jvp.check_combination, case, points)
            elif kernels.applies(case):
                combination, notes = prepare_kernel(case, plan)
            else:
                points, numerical_cache, notes = prepare_points(case, plan)
                combination = partial(check_combination, case, points, cache=numerical_cache)
            for device, dtype_name in combinations:
                unavailable = NUMPY_ON_CPU if case.numpy and device != "cpu" else device_unavailable(device)
                if unavailable:
                    results.append(result_for(case, device, dtype_name, Verdict.SKIPPED, message=unavailable))
                    continue
                result = combination(device, dtype_name, plan=plan)
                result.notes.extend(notes)
                result.notes.extend(note for note in cast_notes(case, dtype_name) if note not in result.notes)
                results.append(result)
        except CaseError as exc:  # the case is broken (or out of time) for what is left to check
            found = getattr(exc, "partial", None)
            if found is not None:
                results.append(found)
            results.extend(_broken(case, d, t, str(exc), exc, label) for d, t in combinations[len(results) :])
        except Exception as exc:  # noqa: BLE001 - a bug here must not hide the other cases
            reason = f"internal error of backprop_check: {one_line(exc)} (--traceback shows where; please report it)"
            results.extend(_broken(case, d, t, reason, exc, label) for d, t in combinations[len(results) :])
    elapsed = time.perf_counter() - started
    for result in results:
        result.seconds = elapsed / max(1, len(results))
        result.numpy = case.numpy
    return [jvp.named(result, case) for result in results] if mode == jvp.MODE else results


def prepare_kernel(case: Case, plan: Plan) -> tuple[Callable[..., Result], list[str]]:
    """A kernel checked against its reference (engine/reference.py): the points and the
    referee's checks of the reference at each (float64, on the CPU, once for every device and
    dtype), and the function that checks one device × dtype."""
    kernel, twin = case, kernels.twin_of(case, plan.seed, plan.full)
    points, cache, notes = prepare_points(twin, plan)
    tol = tolerance_for(torch.float64, case.rtol, case.atol)
    referee: dict[str, list[Check]] = {}
    for point in points:
        key = (point.label, "float64")
        if key not in cache:
            cache[key] = numerical_for(twin, point, torch.float64, plan)
        require_finite_loss(cache[key].gradients.loss, point, case)
        checked = check_point(twin, point, "cpu", torch.float64, cache[key], tol)
        referee[point.label] = kernels.as_reference(checked.checks, tol.describe())

    def combination(device: str, dtype_name: str, *, plan: Any) -> Result:
        return kernels.check_combination(kernel, twin, points, referee, device, dtype_name, plan)

    return combination, notes


def elements(point: Point) -> int:
    """How many numbers a point holds: the size of the work that sets the check's threads."""
    return sum(value.numel() for value in (*point.params.values(), *point.data.values()))


def exact_in(point: Point, dtype: torch.dtype) -> bool:
    """Whether `point` holds only values that `dtype` represents exactly: a run in `dtype` then
    sees the very point a float64 run sees, and the numerical reference (float64 differences at
    the point rounded to the run's dtype) is the same computation, so it is computed once."""
    rounded = point.rounded(dtype)
    return all(
        torch.equal(rounded.params[k], v) for k, v in point.params.items()
    ) and all(torch.equal(rounded.data[k], v) for k, v in point.data.items())


def _broken(case: Case, device: str, dtype: str, reason: str, exc: BaseException, label: str) -> Result:
    """A broken case's result on one device: an error where the device is here, else skipped as
    any case is (one broken file is not four errors on a machine without CUDA, as the pytest
    plugin already has it)."""
    unavailable = NUMPY_ON_CPU if case.numpy and device != "cpu" else device_unavailable(device)
    if unavailable:
        return result_for(case, device, dtype, Verdict.SKIPPED, message=unavailable)
    return error_result(case, device, dtype, reason, exc, label)


def numerical_for(case: Case, point: Point, dtype: torch.dtype, plan: Plan) -> Reference:
    """The numerical reference at `point`: elementwise where that is cheap (everywhere with
    --full), samples and random directions elsewhere."""
    return reference(case, point, dtype, full=plan.full, seed=plan.seed)


def device_unavailable(device: str) -> str | None:
    """Why `device` cannot be used here, or None."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if device == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available"
    return None


def prepare_points(case: Case, plan: Plan) -> tuple[list[Point], dict[tuple[str, str], Reference], list[str]]:
    """The given point and the random ones; a random point on a kink is redrawn."""
    given, notes = checked_given(case, plan.seed)
    points = [given]
    cache: dict[tuple[str, str], Reference] = {}
    for index in range(1, plan.points + 1):
        if plan.progress:
            plan.progress(case.name, "cpu", "float64 reference", index, plan.points)
        for attempt in range(REDRAWS):
            point, numerical, note = random_in_domain(case, given, index, plan.seed, attempt, lambda p: referee_at(case, p, plan))
            if note and note not in notes:
                notes.append(note)
            if not any(bool(mask.any()) for mask in numerical.gradients.kink.values()):
                break
        else:
            notes.append(f"{point.describe()} still sits on a kink after {REDRAWS} draws")
        points.append(point)
        cache[(point.label, "float64")] = numerical
    return points, cache, notes


def referee_at(case: Case, point: Point, plan: Plan) -> Reference:
    """The float64 reference at a random point, whose loss and gradient must be finite there."""
    numerical = numerical_for(case, point, torch.float64, plan)
    require_finite_loss(numerical.gradients.loss, point, case)
    require_finite_gradient(numerical.gradients, point)
    return numerical


def check_combination(
    case: Case,
    points: list[Point],
    device: str,
    dtype_name: str,
    *,
    cache: dict[tuple[str, str], Reference],
    plan: Plan,
) -> Result:
    """Check one case on one device in one dtype at every point."""
    dtype = getattr(torch, dtype_name)
    tol = tolerance_for(dtype, case.rtol, case.atol)
    outcomes: list[Outcome] = []
    notes: list[str] = []
    reference = None
    try:
        for k, point in enumerate(points, 1):
            if plan.progress:
                plan.progress(case.name, device, dtype_name, k, len(points))
            if k == 1 and dtype != torch.float64 and not case.numpy:
                leaves_inputs_alone(case, point, dtype)
            key = (point.label, dtype_name)
            if key not in cache:
                shared = cache.get((point.label, "float64")) if exact_in(point, dtype) else None
                cache[key] = shared or numerical_for(case, point, dtype, plan)
            numerical = cache[key].gradients
            require_finite_loss(numerical.loss, point, case)
            require_finite_gradient(numerical, point)
            first = not shown_already(outcomes)  # else this point's diagnosis is never shown
            checked = check_point(case, point, device, dtype, cache[key], tol, locate=first)
            checks, autograd = checked.checks, checked.gradients["autograd"]
            checks[:0] = extra_checks(case, point, device, dtype, checks, tol, checked.gradients["numerical"], diagnose=first)
            if point.seed is None:
                checks.extend(expect_checks(case, checked.gradients["numerical"], autograd, dtype, tol, point.complex))
                # numpy case: no autograd; the baseline keeps the manual gradient instead
                stored = autograd if autograd is not None else checked.gradients["manual"]
                reference = {
                    "loss": float(autograd.loss if autograd is not None else numerical.loss),
                    "gradients": {k: stored.values[k].cpu().double().tolist() for k in point.params},
                }
                if autograd is None:
                    reference["source"] = "manual"
            for note in (numerical.note, checked.note):
                if note and note not in notes:
                    notes.append(note)
            outcomes.append(outcome_of(point, checks, checked.gradients, case))
            if checked.timed_out is not None:
                raise checked.timed_out
    except CaseTimeout as exc:
        if any(o.verdict == Verdict.MISMATCH for o in outcomes):  # what was found stands
            result = summarize(case, device, dtype_name, outcomes, tol)
            result.notes.extend(notes + [f"{exc}: the check stopped there; the mismatch found before stands"])
            result.reference = reference
            exc.partial = result
        raise
    except CaseError as exc:
        return error_result(case, device, dtype_name, str(exc.at(point.describe())), exc)
    result = summarize(case, device, dtype_name, outcomes, tol)
    result.notes.extend(notes)
    result.reference = reference
    return result


def extra_checks(
    case: Case, point: Point, device: str, dtype: torch.dtype, checks: list[Check], tol: Tolerance,
    numerical: Gradients | None = None, diagnose: bool = True,
) -> list[Check]:
    """The checks of a kind of case beyond its three gradients, shown before `checks`: a
    distributed check's ranks (the likely slip only where `diagnose`: at a point whose
    message can still be the one shown; told from the referee's `numerical` estimates where
    it has them), a function check's outputs and contract; a plain case has none."""
    if isinstance(case, DistributedCase):
        return case.rank_checks(point, device, dtype, checks, tol, numerical, diagnose)
    if isinstance(case, FunctionCase):
        return outputs.extra_checks(case, point, device, dtype, checks, tol)
    return []


@dataclass
class PointCheck:
    """The checks at one point, the gradients they came from, and what stopped them early."""

    checks: list[Check]
    gradients: dict[str, Gradients | None]
    note: str | None = None
    timed_out: CaseTimeout | None = None


def check_point(
    case: Case, point: Point, device: str, dtype: torch.dtype, numerical: Reference, tol: Tolerance, locate: bool = True
) -> PointCheck:
    """Compute manual and autograd at `point` and compare them with the numerical reference.

    Manual and autograd are compared at every element; where they disagree and the reference
    has no estimate, the referee estimates exactly those elements. A sampled tensor whose
    random directions disagree is bisected down to the elements behind it, where `locate`
    (not at a point after one whose failure is the one shown: the disagreeing directions are
    its verdict, and the bisection's estimates cost most of a failing check). Below float64,
    the tolerance also allows for the dtype's rounding at this very point.
    """
    if case.numpy:  # no autograd for numpy code; its forward still runs in the run's dtype
        autograd = None
        at = point.cast(dtype)
        require_finite_loss(call_forward(case, at)[0], point, case)
    else:
        autograd = SOURCES["autograd"](case, point, device, dtype)
        require_finite_loss(autograd.loss, point, case)
    manual = SOURCES["manual"](case, point, device, dtype) if case.manual_fn else None
    clash = set(numerical.gradients.nodes) & set(point.params)
    if clash:
        raise CaseError(f"node {sorted(clash)[0]!r} has the name of a parameter")
    allowances = None
    if dtype != torch.float64:
        allowances = rounding.allowances(case, point, dtype, {"autograd": autograd, "manual": manual})
    evidence = Evidence(numerical.gradients, autograd, manual, list(point.params), tol, allowances)
    note, timed_out = None, None
    try:
        numerical = refereed(numerical, evidence, locate)
        evidence = replace(evidence, numerical=numerical.gradients)
    except CaseTimeout as exc:  # the directions that disagree still make a mismatch below
        timed_out, note = exc, f"{exc} while locating the wrong elements"
    checks = compare(evidence)
    if allowances is not None and timed_out is None and any(c.verdict == MISMATCH for c in checks):
        # Judged again with the dtype's rounding of the twin's own computation where a value is
        # off its twin by more than allowed (rounding.stochastic_allowances): measured only here.
        try:
            widened = rounding.stochastic_allowances(case, point, dtype, {"autograd": autograd, "manual": manual}, allowances)
        except CaseTimeout as exc:  # the mismatch found stands
            timed_out, note = exc, f"{exc} while measuring {name_of(dtype)}'s rounding at the point"
        else:
            evidence = replace(evidence, rounding=widened)
            checks = compare(evidence)
            note = "; ".join(widened.notes) or None
            if any(c.verdict == MISMATCH for c in checks):
                timed_out, note, evidence, checks = _twins_rejudged(case, point, dtype, widened, evidence, checks, note)
            if timed_out is None and any(c.verdict == MISMATCH for c in checks):
                timed_out, note, evidence, checks = _own_function(case, point, dtype, evidence, checks, note, tol, autograd, manual)
    elif allowances is None and timed_out is None and any(c.verdict == MISMATCH for c in checks):
        # Judged again with float64's own rounding at this point (rounding.float64_allowances):
        # measured only here, where a mismatch would otherwise be reported.
        sources = {"autograd": autograd, "manual": manual}
        try:
            measured = rounding.float64_allowances(case, point, device, sources, evidence.numerical)
        except CaseTimeout as exc:  # the mismatch found stands
            timed_out, note = exc, f"{exc} while measuring float64's rounding at the point"
        else:
            evidence = replace(evidence, rounding=measured)
            checks = compare(evidence)
            whole, stopped = _sampled(numerical, measured.widened), None
            if whole and not any(c.verdict == MISMATCH for c in checks):
                # Widened elements' rounding adds up along a sampled tensor's random directions,
                # where a slip in an element not estimated could hide (a saturated attention at
                # 1e3: dq is rounding at some elements, and 3 % off at its largest one passed):
                # every element of it is estimated, and float64's rounding measured again.
                try:
                    refined = numerical.refine({name: torch.arange(numerical.gradients.values[name].numel()) for name in whole})
                    remeasured = rounding.float64_allowances(case, point, device, sources, refined.gradients)
                except CaseTimeout as exc:  # what was found stands
                    timed_out, stopped = exc, f"{exc} while estimating every element of {', '.join(whole)}"
                except CaseError:  # fn refuses a step at an element the samples left out: likewise
                    pass
                else:
                    numerical, measured = refined, remeasured
                    evidence = replace(evidence, numerical=numerical.gradients, rounding=measured)
                    checks = compare(evidence)
            lines = [*measured.notes, *([stopped] if stopped else [])]
            if lines:
                note = "; ".join(lines)
    complexes.mark(checks, point.complex)
    unresolved = None if allowances is None else allowances.note(dtype)
    if unresolved:
        note = unresolved if note is None else f"{note}; {unresolved}"
    if device != "cpu" and timed_out is None and autograd is not None:
        on_cpu = SOURCES["autograd"](case, point, "cpu", dtype)
        checks.extend(device_checks(autograd, on_cpu, evidence.params, device, tol))
    gradients = {"manual": manual, "numerical": numerical.gradients, "autograd": autograd}
    return PointCheck(checks, gradients, note, timed_out)


def _sampled(numerical: Reference, names: frozenset[str]) -> list[str]:
    """The `names` checked by samples and directions, up to rounding.OWN_MOST elements each."""
    checked = numerical.gradients.checked
    return sorted(
        name for name in names
        if name in checked and not bool(checked[name].all()) and checked[name].numel() <= rounding.OWN_MOST
    )


def _twins_rejudged(
    case: Case, point: Point, dtype: torch.dtype, found: rounding.Rounding, evidence: Evidence, checks: list[Check], note: str | None
) -> tuple[CaseTimeout | None, str | None, Evidence, list[Check]]:
    """Below float64, a mismatch judged again with float64's own rounding of the float64 twins
    (`rounding.float64_allowances` at the rounded point where they ran), as a float64 run judges
    the same code before it reports one (erfcx's backward at 1e6 keeps three digits in float64)."""
    twins = {source: Gradients(source, values) for source, values in found.twin.items() if values}
    if not twins:
        return None, note, evidence, checks
    try:
        measured = rounding.float64_allowances(case, point.rounded(dtype), "cpu", twins, evidence.numerical)
    except CaseTimeout as exc:  # the mismatch found stands
        return exc, f"{exc} while measuring float64's rounding of the float64 twins", evidence, checks
    evidence = replace(evidence, rounding=replace(found, twin_allowance=measured.allowance))
    checks = compare(evidence)
    if measured.notes:
        twin_note = "; ".join(f"float64 twin: {line}" for line in measured.notes)
        note = twin_note if note is None else f"{note}; {twin_note}"
    return None, note, evidence, checks


def _own_function(
    case: Case, point: Point, dtype: torch.dtype, evidence: Evidence, checks: list[Check], note: str | None,
    tol: Tolerance, autograd: Gradients | None, manual: Gradients | None,
) -> tuple[CaseTimeout | None, str | None, Evidence, list[Check]]:
    """Below float64, a mismatch judged again where the dtype's function is another than its
    float64 twin (`rounding.own_function_allowances`: nn.RMSNorm's eps=None)."""
    found = evidence.rounding
    assert found is not None
    try:
        widened = rounding.own_function_allowances(case, point, dtype, {"autograd": autograd, "manual": manual}, found, tol)
    except CaseTimeout as exc:  # the mismatch found stands
        return exc, f"{exc} while estimating {name_of(dtype)}'s own function at the point", evidence, checks
    except CaseError:  # the forward refuses a step in the dtype itself: the mismatch found stands
        return None, note, evidence, checks
    if widened is found:
        return None, note, evidence, checks
    evidence = replace(evidence, rounding=widened)
    added = [line for line in widened.notes if line not in found.notes]
    if added:
        note = "; ".join(added) if note is None else f"{note}; {'; '.join(added)}"
    return None, note, evidence, compare(evidence)


def refereed(numerical: Reference, evidence: Evidence, locate: bool = True) -> Reference:
    """The reference with every element estimated that a verdict hangs on: where manual and
    autograd disagree, and where a disagreeing direction's bisection leads; every direction on
    a kink is replaced by one that is not, where one is found (`Reference.unkinked`); elements
    tied on a kink are moved together (`Reference.with_ties`)."""
    wanted = disputed(evidence)
    guides = failing_directions(evidence) if locate else []
    # A direction on a kink at the point is no verdict (directions.py): each is replaced by one
    # that is not, where one is found, and that one guides a bisection too where it disagrees.
    for name, directions in list(numerical.gradients.directions.items()):
        agrees = agreement(name, evidence)
        for direction in [d for d in directions if d.kink and d.what == RANDOM]:
            numerical, other = numerical.unkinked(name, direction)
            if other is not direction and not agrees(other) and locate:
                guides.append((name, other, agrees))
    # One bisection per tensor and kind of direction (it finds what any direction shows), and
    # none where manual and autograd already disagree element by element: those are estimated.
    disputed_names, located = set(wanted), set()
    for name, direction, agrees in guides:
        if (name, direction.kink) in located or name in disputed_names:
            continue
        located.add((name, direction.kink))
        found = numerical.locate(name, direction, agrees)
        if found.numel():
            wanted[name] = torch.cat([wanted[name], found]).unique() if name in wanted else found
    # Elements tied on a kink (a max over equal values) pass one by one; moved together they must sum right.
    return numerical.refine(wanted).with_ties()
