"""The tolerance, unit by unit: the dtype's defaults, a case's rtol/atol, the three rules
(`allowed`, `between`, `along`), and the rounding allowance measured at one point
(engine/rounding.py)."""
from __future__ import annotations

import math

import pytest
import torch

from backprop_check import case
from backprop_check.engine.sides import ratios
from backprop_check.engine.tolerance import FLOOR_ULPS, SIGMAS, Tolerance, tolerance_for
from backprop_check.errors import CaseError
from backprop_check.model.points import given_point
from backprop_check.sources import Gradients
from backprop_check.engine.rounding import DEVIATION_CAP, UNRESOLVED_ULPS, Rounding, allowances

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps
TINY64 = torch.finfo(torch.float64).tiny


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- the defaults and a case's own rtol/atol -------------------------------------------------


def test_float64_defaults_have_no_twin_and_float64s_epsilon() -> None:
    tol = tolerance_for(torch.float64)
    assert (tol.rtol, tol.atol, tol.absolute, tol.rtol_given) == (1e-7, 1e-12, 0.0, 0.0)
    assert tol.eps == EPS64
    assert tol.underflow == TINY64
    assert tol.twin is None


def test_float32_defaults_are_looser_and_carry_a_float64_twin() -> None:
    tol = tolerance_for(torch.float32)
    assert (tol.rtol, tol.atol) == (1e-4, 2e-5)
    assert tol.eps == EPS32
    assert tol.underflow == torch.finfo(torch.float32).tiny
    assert tol.twin == tolerance_for(torch.float64)


def test_a_cases_rtol_replaces_the_default_and_is_remembered_as_given() -> None:
    tol = tolerance_for(torch.float64, rtol=1e-3)
    assert (tol.rtol, tol.rtol_given, tol.atol) == (1e-3, 1e-3, 1e-12)


def test_a_cases_atol_is_absolute_and_drops_the_scaled_atol() -> None:
    tol = tolerance_for(torch.float64, atol=1e-5)
    assert (tol.atol, tol.absolute, tol.rtol) == (0.0, 1e-5, 1e-7)


def test_a_dict_by_dtype_name_sets_only_that_dtype_and_the_twin_keeps_float64s() -> None:
    tol = tolerance_for(torch.float32, rtol={"float32": 1e-2})
    assert tol.rtol == 1e-2
    assert tol.twin is not None and tol.twin.rtol == 1e-7
    assert tolerance_for(torch.float64, rtol={"float32": 1e-2}).rtol == 1e-7


@pytest.mark.parametrize("given", [pytest.param("loose", id="a-word"), pytest.param([1e-3], id="a-list")])
def test_an_rtol_that_is_not_a_number_is_a_broken_case(given: object) -> None:
    with pytest.raises(CaseError, match=r"rtol= and atol= take a number or a dict by dtype name, got"):
        tolerance_for(torch.float64, rtol=given)


# --- allowed: a source against the numerical reference ----------------------------------------


def test_allowed_is_rtol_of_the_reference_plus_atol_of_the_tensors_largest_gradient() -> None:
    tol = Tolerance(rtol=1e-3, atol=1e-4, absolute=1e-6)
    assert torch.allclose(tol.allowed(t(-2.0, 0.0), 10.0), t(2e-3 + 1e-3 + 1e-6, 1e-3 + 1e-6), rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "factor, passes",
    [pytest.param(1 - 1e-6, True, id="just-below-passes"), pytest.param(1 + 1e-6, False, id="just-above-fails")],
)
def test_a_difference_just_inside_the_float64_tolerance_passes_and_just_outside_fails(factor: float, passes: bool) -> None:
    tol = tolerance_for(torch.float64)
    reference, scale = t(3.0), 5.0
    allowed = tol.allowed(reference, scale)
    expected = 1e-7 * 3.0 + 1e-12 * 5.0 + TINY64
    assert float(allowed) == pytest.approx(expected, rel=1e-12)
    ratio = ratios(allowed * factor, allowed)
    assert bool(ratio <= 1) is passes


def test_a_float64_gradient_off_by_a_relative_1e6_fails() -> None:
    tol = tolerance_for(torch.float64)
    reference = t(1.0)
    assert bool(ratios(t(1e-6), tol.allowed(reference, 1.0)) > 1)


def test_a_float32_gradient_off_by_a_relative_1e3_fails() -> None:
    tol = tolerance_for(torch.float32)
    reference = t(1.0)
    assert bool(ratios(t(1e-3), tol.allowed(reference, 1.0)) > 1)


# --- between: manual against autograd, elementwise -------------------------------------------


def test_between_has_no_atol_scaled_by_the_tensor_so_a_small_wrong_element_fails() -> None:
    tol = tolerance_for(torch.float64)
    manual, autograd = t(1000.0, 1e-3 * 1.01), t(1000.0, 1e-3)
    allowed = tol.between(manual, autograd, torch.zeros(2, dtype=torch.float64), largest=1000.0)
    floor = FLOOR_ULPS * EPS64 * 1000.0
    assert float(allowed[1]) == pytest.approx(2 * 1e-7 * 1e-3 * 1.01 + floor + TINY64, rel=1e-12)
    assert bool(ratios((manual - autograd).abs(), allowed)[1] > 1)


def test_between_adds_the_rounding_allowance_given() -> None:
    tol = tolerance_for(torch.float64)
    zeros = torch.zeros(1, dtype=torch.float64)
    without = tol.between(t(1.0), t(1.0), zeros, largest=1.0)
    assert torch.equal(tol.between(t(1.0), t(1.0), t(0.25), largest=1.0), without + 0.25)


def test_the_floor_is_floor_ulps_of_the_largest_gradient() -> None:
    assert tolerance_for(torch.float32).floor(2.0) == FLOOR_ULPS * EPS32 * 2.0
    assert tolerance_for(torch.float64).floor(0.0) == 0.0


def test_a_gradient_exactly_zero_against_rounding_sized_noise_agrees() -> None:
    tol = tolerance_for(torch.float64)
    allowed = tol.between(t(1e-18), t(3e-19), torch.zeros(1, dtype=torch.float64), largest=1.0)
    assert bool(ratios(t(1e-18 - 3e-19), allowed) <= 1)


# --- along: a directional derivative's own rounding -------------------------------------------


def test_along_grows_like_the_square_root_of_the_size_for_random_signs() -> None:
    tol = tolerance_for(torch.float64)
    for n in (4, 400):
        gradient = torch.ones(n, dtype=torch.float64)
        signs = torch.ones(n, dtype=torch.float64)
        assert tol.along(gradient, signs, None) == pytest.approx(SIGMAS * FLOOR_ULPS * EPS64 * math.sqrt(n), rel=1e-12)


def test_along_leaves_the_default_rtol_out_and_keeps_a_cases_own() -> None:
    gradient, vector = torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    default = tolerance_for(torch.float64).along(gradient, vector, None)
    given = tolerance_for(torch.float64, rtol=1e-3).along(gradient, vector, None)
    assert default < 1e-7  # no √n · rtol
    assert given == pytest.approx(SIGMAS * (FLOOR_ULPS * EPS64 + 1e-3) * 2.0, rel=1e-12)


def test_along_with_a_measured_rounding_uses_four_ulps_plus_the_allowance() -> None:
    tol = tolerance_for(torch.float32)
    gradient, vector, rounding = t(1.0), t(1.0), t(0.5)
    assert tol.along(gradient, vector, rounding) == pytest.approx(SIGMAS * (4.0 * EPS32 + 0.5), rel=1e-12)


def test_along_for_a_float64_twin_uses_float64s_epsilon() -> None:
    tol = tolerance_for(torch.float32)
    assert tol.along(t(1.0), t(1.0), None, exact=True) == pytest.approx(SIGMAS * FLOOR_ULPS * EPS64, rel=1e-12)


@pytest.mark.parametrize(
    "tol, text",
    [
        pytest.param(Tolerance(rtol=1e-7, atol=1e-12), "rtol 1e-07, atol 1e-12·max|grad|", id="default"),
        pytest.param(Tolerance(rtol=1e-3, atol=0.0, absolute=1e-5), "rtol 0.001, atol 1e-05", id="absolute"),
    ],
)
def test_describe_says_each_part_that_is_set(tol: Tolerance, text: str) -> None:
    assert tol.describe() == text


# --- the rounding allowance at one point (engine/rounding.py) --------------------------------


def cubic() -> object:
    @case(params={"w": [1.5, -1.25, 2.0]})
    def cubic(w: torch.Tensor) -> torch.Tensor:
        return (w**3).sum()

    @cubic.manual
    def cubic_manual(w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w": 3 * w**2}

    return cubic


def test_an_honest_float32_gradient_is_covered_by_its_allowance_and_has_a_float64_twin() -> None:
    c = cubic()
    point = given_point(c, 0)
    w32 = point.params["w"].to(torch.float32)
    honest = Gradients("autograd", {"w": 3 * w32**2})
    rounding = allowances(c, point, torch.float32, {"autograd": honest, "manual": None})
    twin = rounding.twin["autograd"]["w"]
    assert twin.dtype == torch.float64
    assert torch.allclose(twin, 3 * point.rounded(torch.float32).params["w"] ** 2, rtol=1e-15, atol=0)
    assert bool(((honest.values["w"].double() - twin).abs() <= rounding.allowance["autograd"]["w"]).all())
    assert "manual" not in rounding.allowance
    assert rounding.note(torch.float32) is None


def test_a_derivation_slip_is_excused_at_most_up_to_the_deviation_cap() -> None:
    c = cubic()
    point = given_point(c, 0)
    w32 = point.params["w"].to(torch.float32)
    slipped = Gradients("manual", {"w": 2 * w32**2})  # 2 for 3: off by a third
    rounding = allowances(c, point, torch.float32, {"manual": slipped})
    g = rounding.twin["manual"]["w"]
    cap = DEVIATION_CAP * torch.maximum(g.abs(), g.square().mean().sqrt())
    allowance = rounding.allowance["manual"]["w"]
    assert bool((allowance <= cap * 1.01).all())
    assert bool(((slipped.values["w"].double() - g).abs() > allowance).all())


def test_the_note_names_the_elements_judged_by_their_float64_twin_alone() -> None:
    rounding = Rounding({}, {}, {"w": (2, 6)})
    note = rounding.note(torch.float32)
    assert note is not None
    assert note.startswith("float32 cannot resolve the gradient at 2 of 6 elements of 'w' at this point")
    assert f"{UNRESOLVED_ULPS} float32 ulps" in note and "5%" in note
    assert "\n" not in note


def test_elements_the_dtype_cannot_resolve_are_named_for_their_float64_twin() -> None:
    # 16 elements: the one-ulp nudges have random signs, and all alike would not show the spread
    @case(params={"w": [1e6 + 1e-3 * k for k in range(16)]})
    def spread(w: torch.Tensor) -> torch.Tensor:
        c = w - w.mean()  # float32 holds 1e6 to 0.0625: the spread is below its resolution
        return (c**3).sum()

    point = given_point(spread, 0)
    autograd = Gradients("autograd", {"w": torch.zeros(16)})
    rounding = allowances(spread, point, torch.float32, {"autograd": autograd})
    assert rounding.unresolved == {"w": (16, 16)}
    note = rounding.note(torch.float32)
    assert note is not None and note.startswith("float32 cannot resolve the gradient at 16 of 16 elements of 'w'")


def test_a_dict_keyed_by_a_name_that_is_no_dtype_is_a_broken_case() -> None:
    with pytest.raises(CaseError, match="fp32"):
        tolerance_for(torch.float32, rtol={"fp32": 1e-2})
