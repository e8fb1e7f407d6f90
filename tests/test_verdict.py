"""The verdict, unit by unit: from hand-made checks at hand-made points to one outcome per point,
one result per case (which source is the odd one out, which point speaks), and its message."""
from __future__ import annotations

import torch

from backprop_check import case
from backprop_check.engine.verdict import (
    TWINS,
    _verdict_of,
    describe,
    disagreeing,
    error_result,
    first_bad_node,
    judged_by,
    outcome_of,
    summarize,
)
from backprop_check.engine.tolerance import tolerance_for
from backprop_check.errors import CaseError
from backprop_check.model.points import Point
from backprop_check.records import Check, Culprit, Outcome, Verdict

GIVEN = Point("given point", None, {}, {})
RANDOM = Point("random point 1", 17, {}, {})
TOL64 = tolerance_for(torch.float64)


def check(name: str = "w", verdict: str = "ok", culprit: str | None = None, kind: str = "param", **fields: object) -> Check:
    return Check(name=name, kind=kind, shape=(3,), verdict=verdict, culprit=culprit, **fields)  # type: ignore[arg-type]


def wrong(name: str = "w", culprit: str | None = "manual", kind: str = "param", **fields: object) -> Check:
    given = dict(
        index=(1,), manual=2.0, numerical=3.0, autograd=3.0, error_bar=1e-9, abs_err=1.0, rel_err=1 / 3,
        allowed=3e-7, ratio=1 / 3e-7, bad=1, size=3, culprits={Culprit(culprit): 1} if culprit else {},
    )
    return check(name, "mismatch", culprit, kind, **(given | fields))


def linear() -> object:
    @case(params={"w": [1.0, 2.0, 3.0]}, data={"x": [1.0, 1.0, 1.0]})
    def linear(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (w * x).sum()

    return linear


def failing(point: Point, *checks: Check) -> Outcome:
    return outcome_of(point, list(checks))


# --- one point ----------------------------------------------------------------------------------


def test_every_check_ok_is_ok_with_no_culprit() -> None:
    outcome = failing(GIVEN, check("w"), check("h", kind="node"))
    assert (outcome.verdict, outcome.culprit) == (Verdict.OK, None)


def test_a_kink_without_a_mismatch_is_nondifferentiable() -> None:
    outcome = failing(GIVEN, check("w"), check("b", verdict="nondifferentiable"))
    assert (outcome.verdict, outcome.culprit) == (Verdict.NONDIFFERENTIABLE, None)


def test_a_mismatch_wins_over_a_kink_and_names_the_one_odd_source() -> None:
    outcome = failing(GIVEN, check("b", verdict="nondifferentiable"), wrong("w", "autograd"))
    assert (outcome.verdict, outcome.culprit) == (Verdict.MISMATCH, Culprit.AUTOGRAD)


def test_the_parameters_culprit_speaks_before_a_nodes() -> None:
    outcome = _verdict_of(GIVEN, [wrong("h", "numerical", kind="node"), wrong("w", "manual")])
    assert outcome.culprit == Culprit.MANUAL


def test_two_parameters_blaming_two_sources_blame_no_one() -> None:
    outcome = _verdict_of(GIVEN, [wrong("w", "manual"), wrong("b", "autograd")])
    assert (outcome.verdict, outcome.culprit) == (Verdict.MISMATCH, None)


def test_a_mismatch_keeps_the_gradients_it_was_given_and_an_ok_point_does_not() -> None:
    kept = outcome_of(GIVEN, [wrong()], {"manual": None})
    assert kept.gradients == {"manual": None}
    assert outcome_of(GIVEN, [check()], {"manual": None}).gradients == {}


# --- every point: one result ----------------------------------------------------------------------


def test_the_first_failing_point_speaks_and_names_the_odd_source_out() -> None:
    c = linear()
    outcomes = [failing(GIVEN, check()), failing(RANDOM, wrong("w", "manual"))]
    result = summarize(c, "cpu", "float64", outcomes, TOL64)
    assert (result.verdict, result.culprit, result.points) == (Verdict.MISMATCH, Culprit.MANUAL, 2)
    assert (result.point, result.seed) == ("random point 1 (seed 17)", 17)
    assert result.message.startswith(
        "manual is the odd one out at the random point 1 (seed 17): dloss/dw[1]: manual 2, numerical 3 ± 1e-09, "
        "autograd 3; error 1 (rel 0.333), 3.33e+06× the tolerance 3e-07 (rtol 1e-07, atol 1e-12·max|grad|)"
    )
    assert result.message.endswith("; 1 of 2 points disagree")


def test_an_undecided_point_does_not_veto_the_culprit_another_point_names() -> None:
    c = linear()
    undecided = failing(GIVEN, wrong("w", None, culprits={Culprit.UNDECIDED: 1}))
    decided = failing(RANDOM, wrong("w", "autograd"))
    result = summarize(c, "cpu", "float64", [undecided, decided], TOL64)
    assert result.culprit == Culprit.AUTOGRAD
    assert result.seed == 17


def test_two_points_blaming_two_sources_blame_no_one() -> None:
    c = linear()
    outcomes = [failing(GIVEN, wrong("w", "manual")), failing(RANDOM, wrong("w", "autograd"))]
    result = summarize(c, "cpu", "float64", outcomes, TOL64)
    assert (result.verdict, result.culprit) == (Verdict.MISMATCH, None)
    assert result.message.startswith("the sources disagree and no single one is the odd one out at the given point")


def test_an_ok_result_shows_the_closest_call_over_every_point() -> None:
    c = linear()
    outcomes = [failing(GIVEN, check(ratio=0.1)), failing(RANDOM, check("w", index=(2,), ratio=0.5))]
    result = summarize(c, "cpu", "float64", outcomes, TOL64)
    assert (result.verdict, result.culprit, result.seed) == (Verdict.OK, None, 17)
    assert result.message == "all agree; closest call w[2] at 0.5× its tolerance (rtol 1e-07, atol 1e-12·max|grad|)"


def test_a_kinked_result_says_how_to_move_the_point() -> None:
    c = linear()
    kinked = check("w", verdict="nondifferentiable", kinks=1, note="one-sided derivatives 1 and -1")
    result = summarize(c, "cpu", "float64", [failing(GIVEN, check()), failing(RANDOM, kinked)], TOL64)
    assert (result.verdict, result.seed) == (Verdict.NONDIFFERENTIABLE, 17)
    assert "random point 1 (seed 17) is on a kink" in result.message
    assert "w (one-sided derivatives 1 and -1)" in result.message
    assert "constrain random points with sample= to lie farther than a step from the kink" in result.message


def test_the_result_carries_the_cases_place_and_order() -> None:
    c = linear()
    result = summarize(c, "cpu", "float32", [failing(GIVEN, check())], "rtol 1")
    assert (result.case, result.device, result.dtype, result.file, result.line, result.order) == (
        "linear", "cpu", "float32", c.file, c.line, 1,
    )


# --- the message's parts ----------------------------------------------------------------------------


def test_the_first_bad_node_is_the_first_node_of_the_culprit() -> None:
    checks = [wrong("w"), wrong("h2", "autograd", kind="node"), wrong("h1", kind="node"), wrong("h0", kind="node")]
    assert first_bad_node(checks, Culprit.MANUAL) == "h1"
    assert first_bad_node(checks, None) == "h2"
    assert first_bad_node([wrong("w")], Culprit.MANUAL) is None


def test_a_comparison_of_float64_twins_is_said_to_be_judged_by_float64s_tolerance() -> None:
    tol32 = tolerance_for(torch.float32)
    assert judged_by(tol32, f"manual vs numerical {TWINS}") == (
        "float64's rtol 1e-07, atol 1e-12·max|grad|, for the float64 twins: the same code run in float64 at this point"
    )
    assert judged_by(tol32, "manual vs numerical") == "rtol 0.0001, atol 2e-05·max|grad|"
    assert judged_by("as given", f"x {TWINS}") == "as given"


def test_disagreeing_counts_only_more_than_one_element() -> None:
    assert disagreeing(check(bad=1, size=9)) == ""
    assert disagreeing(check(bad=3, size=9)) == "; 3 of 9 elements disagree"
    assert disagreeing(check(bad=3, size=9), " of 'w'") == "; 3 of 9 elements of 'w' disagree"


def test_disagreeing_says_a_count_over_a_sample_is_a_lower_bound() -> None:
    sampled = check(bad=3, size=100, coverage={"numerical": 30, "manual_vs_autograd": 100})
    assert disagreeing(sampled) == (
        "; at least 3 of 100 elements disagree (counted among the 30 estimated numerically and every element "
        "where manual and autograd differ)"
    )


def test_a_numpy_cases_message_has_no_autograd_value() -> None:
    c = linear()
    shown = failing(GIVEN, wrong("w", "manual", autograd=None))
    result = summarize(c, "cpu", "float64", [shown], TOL64)
    text = describe(result, shown, 1, 1, TOL64)
    assert "dloss/dw[1]: manual 2, numerical 3 ± 1e-09; error 1" in text
    assert "autograd" not in text


def test_a_rounding_allowance_is_said_with_the_dtype() -> None:
    c = linear()
    shown = failing(GIVEN, wrong("w", "manual", rounding=2.5e-6))
    result = summarize(c, "cpu", "float32", [shown], "rtol 0.0001")
    assert "(rtol 0.0001, + 2.5e-06 for float32 rounding at this point)" in result.message


def test_an_error_result_names_the_case_where_and_why_with_the_cause_traceback() -> None:
    c = linear()
    try:
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError as cause:
            raise CaseError("the forward raised ZeroDivisionError") from cause
    except CaseError as exc:
        result = error_result(c, "cpu", "float64", str(exc), exc)
    assert result.verdict == Verdict.ERROR
    assert result.message == f"{c.where}: linear: the forward raised ZeroDivisionError"
    assert result.traceback is not None and "ZeroDivisionError: division by zero" in result.traceback
    assert error_result(c, "cpu", "float64", "late", name="linear (fwd)").message == f"{c.where}: linear (fwd): late"
