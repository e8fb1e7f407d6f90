"""The run: load → plan (case × device × dtype × point) → three gradients → compare → Report."""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .case import Case
from .compare import OK, Check, compare, direction_agrees, directions_agree
from .errors import CaseError, CaseTimeout, UsageError, one_line
from . import rounding
from .limits import time_limit
from .loader import LoadFailure, load
from .points import Point, given_point, random_point
from .guards import check_forward_is_pure, empty_parameters, require_finite_gradient, require_finite_loss
from .references import device_checks, expect_checks
from .report import Report, Result
from .verdict import Outcome, error_result, outcome_of, result_for, summarize
from .select import matches
from .sources import SOURCES, Gradients
from .sources.numerical import blocks
from .tolerance import Tolerance, tolerance_for

DEVICES = ("cpu", "cuda")
DTYPES = ("float64", "float32")
POINTS = 3
REDRAWS = 5
# Tensors larger than this are checked along random directions plus a sample of elements,
# and element by element only where those disagree (unless Plan.full).
SAMPLE_ABOVE = 2048
TIMEOUT = 300.0  # seconds per case: generous, so that only a hanging case meets it


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
    cases, failures = load(targets, timeout=plan.timeout)
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
        traceback=failure.traceback,
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
                    results.append(result_for(case, device, dtype_name, "skipped", message=unavailable))
                    continue
                result = check_combination(case, points, device, dtype_name, numerical_cache, plan)
                result.notes.extend(notes)
                results.append(result)
        except CaseError as exc:  # the case is broken (or out of time) for what is left to check
            results.extend(error_result(case, d, t, str(exc), exc) for d, t in combinations[len(results) :])
        except Exception as exc:  # noqa: BLE001 - a bug here must not hide the other cases
            reason = f"internal error of backprop_check: {one_line(exc)} (--traceback shows where; please report it)"
            results.extend(error_result(case, d, t, reason, exc) for d, t in combinations[len(results) :])
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
        sources = _comparable(name, autograd, manual)
        if (check is not None and check.verdict != OK) or not directions_agree(numerical, name, sources, tol):
            suspects.append(name)
    return suspects


def localize(
    case: Case,
    point: Point,
    dtype: torch.dtype,
    name: str,
    autograd: Gradients,
    manual: Gradients | None,
    tol: Tolerance,
) -> torch.Tensor:
    """The flat indices of a sampled tensor to check one by one: the blocks whose directional
    derivatives disagree, or every element when no block does (the whole-tensor direction saw
    something the blocks did not)."""
    sources = _comparable(name, autograd, manual)
    bad = [index for index, direction in blocks(case, point, dtype, name) if not direction_agrees(direction, sources, tol)]
    size = autograd.values[name].numel()
    return torch.cat(bad) if bad else torch.arange(size)


def _comparable(name: str, autograd: Gradients, manual: Gradients | None) -> list[torch.Tensor]:
    """The sources' gradients of `name` that have its shape."""
    sources = [autograd.values[name]]
    if manual is not None and name in manual.values and manual.values[name].shape == autograd.values[name].shape:
        sources.append(manual.values[name])
    return sources


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
    notes = empty_parameters(given)
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
            require_finite_loss(numerical.loss, point)
            require_finite_gradient(numerical, point)
            if not any(bool(mask.any()) for mask in numerical.kink.values()):
                break
        else:
            notes.append(f"{point.describe()} still sits on a kink after {REDRAWS} draws")
        points.append(point)
        cache[(point.label, "float64")] = numerical
    return points, cache, notes


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
            require_finite_loss(numerical.loss, point)
            require_finite_gradient(numerical, point)
            checked = check_point(case, point, device, dtype, numerical, tol)
            checks, autograd = checked.checks, checked.gradients["autograd"]
            checks[:0] = case.extra_checks(point, device, dtype, checks, tol)
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
        return error_result(case, device, dtype_name, f"{exc}{at}", exc)
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
    require_finite_loss(autograd.loss, point)
    manual = SOURCES["manual"](case, point, device, dtype) if case.manual_fn else None
    clash = set(numerical.nodes) & set(point.params)
    if clash:
        raise CaseError(f"node {sorted(clash)[0]!r} has the name of a parameter")
    params = list(point.params)
    gradients = {"manual": manual, "numerical": numerical, "autograd": autograd}
    noise = None
    if dtype != torch.float64:
        noise = rounding.allowances(case, point, dtype, {"autograd": autograd, "manual": manual})
    checks = compare(numerical, autograd, manual, params, tol, noise)
    suspects = sampled_suspects(checks, numerical, autograd, manual, tol)
    if suspects:
        elements = {name: localize(case, point, dtype, name, autograd, manual, tol) for name in suspects}
        numerical.merge(SOURCES["numerical"](case, point, "cpu", dtype, elements=elements))
        checks = compare(numerical, autograd, manual, params, tol, noise)
    if device != "cpu":
        on_cpu = SOURCES["autograd"](case, point, "cpu", dtype)
        checks.extend(device_checks(autograd, on_cpu, params, device, tol))
    return PointCheck(checks, gradients)


