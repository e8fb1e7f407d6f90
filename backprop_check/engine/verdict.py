"""From the checks at every point to one Result: verdict, culprit, first bad node, message."""
from __future__ import annotations

import traceback

import torch

from backprop_check import dtypes
from backprop_check.engine.compare import TWINS
from backprop_check.engine.conjugate import conjugate_hint
from backprop_check.engine.orders import hints_for as derivative_hints
from backprop_check.model.case import Case
from backprop_check.records import MISMATCH, NONDIFFERENTIABLE, OK, Check, CheckKind, Culprit, Outcome, Result, Verdict
from backprop_check.errors import CaseError, CaseTimeout
from backprop_check.diagnosis.graph import graph_of
from backprop_check.diagnosis.hints import code_of, hints_for
from backprop_check.model.points import Point
from backprop_check.sources import Gradients
from backprop_check.engine.tolerance import Tolerance

# How a result with no verdict because the finite differences settle nowhere begins.
UNRESOLVED = "no verdict at the"
# How engine/reference.py names a kernel's comparison with its reference.
KERNEL_COMPARED = "kernel against the float64 reference"


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
        named = {check.culprit for check in bad if check.kind == CheckKind.PARAM} or {check.culprit for check in bad}
        culprit = named.pop() if len(named) == 1 else None
        return Outcome(point, checks, MISMATCH, culprit)
    if any(check.verdict == NONDIFFERENTIABLE for check in checks):
        return Outcome(point, checks, NONDIFFERENTIABLE, None)
    return Outcome(point, checks, OK, None)


def _undecided(outcome: Outcome) -> bool:
    """Whether every disagreement at this point is one the float64 referee cannot decide."""
    bad = [check for check in outcome.checks if check.verdict == MISMATCH]
    return bool(bad) and all(check.culprits and set(check.culprits) == {Culprit.UNDECIDED} for check in bad)


def shown_already(outcomes: list[Outcome]) -> bool:
    """Whether a point among `outcomes` fails with a culprit: `summarize` shows the first such
    point, so a diagnosis made at a later point would never be read."""
    return any(o.verdict == MISMATCH and not _undecided(o) for o in outcomes)


def summarize(case: Case, device: str, dtype: str, outcomes: list[Outcome], tolerance: str | Tolerance) -> Result:
    """One result from the outcomes at every point: the worst point speaks for the rest.
    `tolerance`: the run's (a `Tolerance`, or its description)."""
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
    result = result_for(case, device, dtype, verdict, culprit=culprit)
    result.point, result.seed = shown.point.describe(), shown.point.seed
    result.checks = shown.checks
    result.points = len(outcomes)
    result.first_bad_node = first_bad_node(shown.checks, culprit) if verdict == MISMATCH else None
    if verdict == MISMATCH:
        code = code_of(case.manual_fn) if culprit == Culprit.MANUAL else ""
        hints = hints_for(shown, outcomes, code, code_of(getattr(case, "fn", None) or case.forward))
        if culprit in (Culprit.MANUAL, Culprit.AUTOGRAD) and not any("conjugate" in hint for hint in hints):
            hints += _conjugate_hints(case, shown, device, dtype)
        result.hints = derivative_hints(case, shown, _said_of(case, hints))
    result.message = describe(result, shown, len(failing), len(outcomes), tolerance, case.what)
    return result


def _conjugate_hints(case: Case, shown: Outcome, device: str, dtype: str) -> list[str]:
    """The conjugate slip of a backward whose function has complex outputs (engine/conjugate.py):
    only a hint, so a check that cannot run again says nothing."""
    if not shown.point.complex or not any(c.complex for c in shown.checks):
        return []
    try:
        found = conjugate_hint(case, shown, device, getattr(torch, dtype), dtypes.row(dtype).hint_rtol)
    except CaseTimeout:
        raise
    except Exception:  # noqa: BLE001 - the mismatch stands without the hint
        return []
    return [found] if found else []


def _said_of(case: Case, hints: list[str]) -> list[str]:
    """The hints in terms of what the case differentiates (at order 2: ∇loss·u, not loss)."""
    return hints if case.what == "loss" else [hint.replace("dloss/d", f"d{case.what}/d") for hint in hints]


def first_bad_node(checks: list[Check], culprit: Culprit | None) -> str | None:
    """Walking from the loss toward the parameters, the first node whose gradient is wrong."""
    for check in checks:
        if check.kind == CheckKind.NODE and check.verdict == MISMATCH and (culprit is None or check.culprit == culprit):
            return check.name
    return None


def where_it_slips(result: Result, shown: Outcome) -> str:
    """The step of the chain rule that went wrong: between the first wrong node (or a wrong
    parameter) and the nearest node after it, toward the loss, whose gradient agrees."""
    graph, culprit = shown.graph, result.culprit
    if culprit not in (Culprit.MANUAL, Culprit.AUTOGRAD) or graph is None:
        return f"; the derivation first goes wrong at node {result.first_bad_node!r}" if result.first_bad_node else ""
    given = [c for c in shown.checks if c.kind == CheckKind.NODE and (culprit == Culprit.AUTOGRAD or c.manual is not None)]
    good = [c.name for c in given if c.verdict != MISMATCH]
    if result.first_bad_node:
        bad = result.first_bad_node
        after = graph.nearest(bad, good)
        text = f"; the derivation first goes wrong at node {bad!r}"
        if after:
            step = " or ".join(f"d{name}/d{bad}" for name in after)
            agree = f"{' and '.join(f'dloss/d{name}' for name in after)} agree{'s' * (len(after) == 1)}"
            return f"{text}: {agree}, dloss/d{bad} does not, so the slip is in the step {step}"
        if graph.consumers(bad) == [graph.root]:
            return f"{text}, in the first step back from the loss (d{graph.root}/d{bad})"
        return text
    wrong = [c.name for c in shown.checks if c.kind == CheckKind.PARAM and c.verdict == MISMATCH and c.culprit == culprit]
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


def judged_by(tolerance: str | Tolerance, compared: str | None) -> str:
    """The tolerance a comparison was judged by, in words: below float64 a comparison of the
    float64 twins (`compared` says so) was judged by float64's, not by the run dtype's."""
    if isinstance(tolerance, str):
        return tolerance
    if tolerance.twin is not None and compared and compared.endswith(TWINS):
        return f"float64's {tolerance.twin.describe()}, for the float64 twins: the same code run in float64 at this point"
    return tolerance.describe()


def twin_of(check: Check, source: str) -> str:
    """Where a comparison of `source`'s float64 twin decided (below float64), its value, which the
    error and tolerance beside it are of: float32 cannot resolve an attention's scores of 2e6
    (its gradient is 4e-6 where the truth is 7e-10), and the twin is what was judged."""
    if check.twin is None or not (check.compared or "").startswith(f"{source} vs numerical {TWINS}"):
        return ""
    shown = check.manual if source == "manual" else check.autograd
    if shown is not None and f"{shown:.8g}" == f"{check.twin:.8g}":  # the same digits: nothing to tell apart
        return ""
    return f" (its float64 twin {check.twin:.8g}, judged here)"


def disagreeing(check: Check, of: str = "") -> str:
    """How many elements (`of` a named tensor) disagree, when more than one does. Where only some
    were estimated numerically, only those and the ones where manual and autograd differ are
    counted: the count is a lower bound, and is said so."""
    if check.bad <= 1:
        return ""
    coverage = check.coverage or {}
    estimated = coverage.get("numerical", check.size)
    if estimated < check.size:
        both = " and every element where manual and autograd differ" if coverage.get("manual_vs_autograd") else ""
        return (f"; at least {check.bad} of {check.size} elements{of} disagree (counted among the "
                f"{estimated} estimated numerically{both})")
    return f"; {check.bad} of {check.size} elements{of} disagree"


def describe(result: Result, shown: Outcome, failing: int, total: int, tolerance: str | Tolerance, what: str = "loss") -> str:
    """The result in one or two sentences: which source, which element, how far off (the
    gradient of `what`: the loss, or at order 2 ∇loss·u)."""
    if result.verdict == OK:
        # A gradient before a contract item where they tie (every comparison exact: 0×), so that
        # "closest call grad_output at 0×" does not read as an input's element.
        worst = max(shown.checks, key=lambda c: (c.ratio, c.kind != CheckKind.CONTRACT), default=None)
        return "" if worst is None else (
            f"all agree; closest call {worst.label} at {worst.ratio:.2g}× its tolerance "
            f"({judged_by(tolerance, worst.compared)})"
        )
    if result.verdict == NONDIFFERENTIABLE:
        kinks = [c for c in shown.checks if c.kinks]
        unresolved = [c for c in shown.checks if c.verdict == NONDIFFERENTIABLE and (c.note or "").startswith("unresolved: ")]
        if unresolved and not kinks:
            return f"{UNRESOLVED} {shown.point.describe()}: {unresolved[0].note.removeprefix('unresolved: ')}"
        names = ", ".join(f"{c.label} ({c.note})" for c in kinks[:3])
        far = "move the given point" if shown.point.seed is None else "constrain random points with sample= to lie"
        far += " farther than a step from the kink"
        # The referee shrank the step until the one-sided derivatives held still at three steps
        # in a row (numerical.settle): a kink closer than the last step cannot be told from one
        # at the point (abs at 1e-9 is differentiable there). Say what was seen, and what
        # makes the check possible.
        return (
            f"the {shown.point.describe()} is on a kink or within a finite-difference step of one (the "
            f"smallest step, 2⁻²³·max(1, |value|) or less): {names}; the one-sided derivatives stayed apart at three "
            "steps in a row, so no single gradient can be checked there, and the sources agree within the "
            f"interval between them; to check the gradient, {far}"
        )
    bad = [c for c in shown.checks if c.verdict == MISMATCH]
    params = [c for c in bad if c.kind != CheckKind.NODE] or bad
    check = params[0]
    if result.culprit:
        who = f"{result.culprit} is the odd one out"
    elif all(c.kind == CheckKind.EXPECT for c in bad):  # manual, numerical and autograd agree with each other
        who = "the published value (expect=) is the odd one out: the three sources agree with each other"
    elif any(c.kind == CheckKind.OUTPUT and c.compared == KERNEL_COMPARED for c in bad):
        who = "the kernel's forward is the odd one out"
    else:
        who = "the sources disagree and no single one is the odd one out"
    # A kernel against its reference, or the reference against the referee, says itself in its
    # note (engine/reference.py).
    kernel = (check.numerical is None or check.culprit == Culprit.REFERENCE) and check.index is not None and check.note
    if check.kind in (CheckKind.EXPECT, CheckKind.DEVICE, CheckKind.JVP) or kernel:
        text = f"{check.note}"
    elif check.index is None:
        text = f"{check.name}: {check.note}"
    else:
        values = [f"numerical {check.numerical:.8g} ± {check.error_bar:.2g}"]
        if check.manual is not None:
            values.insert(0, f"manual {check.manual:.8g}{twin_of(check, 'manual')}")
        if check.autograd is not None:  # None for a numpy case
            values.append(f"autograd {check.autograd:.8g}{twin_of(check, 'autograd')}")
        text = (
            f"d{what}/d{check.label}: {', '.join(values)}; error {check.abs_err:.3g} "
            f"(rel {check.rel_err:.3g}), {check.ratio:.3g}× the tolerance {check.allowed:.3g} "
            f"({judged_by(tolerance, check.compared)}"
            + (f", + {check.rounding:.2g} for {result.dtype} rounding at this point)" if _shown(check, result.dtype) else ")")
        )
        text += disagreeing(check)
    where = f" at the {shown.point.describe()}"
    expect_only = all(c.kind == CheckKind.EXPECT for c in bad)  # published values hold at the given point only
    others = f"; {failing} of {total} points disagree" if total > 1 and not expect_only else ""
    return f"{who}{where}: {text}{others}{where_it_slips(result, shown)}"


def result_for(case: Case, device: str, dtype: str, verdict: Verdict, **fields) -> Result:  # noqa: ANN003
    fields.setdefault("order", case.level)
    return Result(case=case.name, device=device, dtype=dtype, verdict=verdict, file=case.file, line=case.line, **fields)


def error_result(
    case: Case, device: str, dtype: str, reason: str, exc: BaseException | None = None, name: str | None = None
) -> Result:
    """An error result; `name` is what the check is called when not the case's own name
    (forward mode's `f (fwd)`)."""
    cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
    trace = "".join(traceback.format_exception(cause)) if cause is not None else None
    message = f"{case.where}: {name or case.name}: {reason}"
    return result_for(case, device, dtype, Verdict.ERROR, message=message, traceback=trace)


def _shown(check: Check, dtype: str) -> bool:
    """Whether the tolerance's rounding part is worth a word: always below float64; in float64
    (measured only to judge a mismatch again) where it is a tenth of the tolerance or more."""
    return bool(check.rounding) and (dtype != "float64" or check.rounding >= 0.1 * check.allowed)
