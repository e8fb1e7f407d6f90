"""The two exact sources lined up, unit by unit: the rounding floor's scale, the ratio rule,
`Sides` built from hand-made gradients, the elements manual and autograd dispute, and the
manual gradient reshaped (or diagnosed) against the reference's shape."""
from __future__ import annotations

import math

import pytest
import torch

from backprop_check.engine.sides import Evidence, Sides, aligned_manual, disputed, largest_gradient, ratios
from backprop_check.engine.tolerance import tolerance_for
from backprop_check.errors import CaseError
from backprop_check.records import Check, Culprit, Verdict
from backprop_check.sources import Gradients
from backprop_check.engine.rounding import Rounding

TOL64 = tolerance_for(torch.float64)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def grads(source: str, **values: torch.Tensor) -> Gradients:
    return Gradients(source, dict(values))


# --- the scale and the ratio -------------------------------------------------------------------------


def test_the_largest_gradient_is_over_the_parameters_only_and_skips_non_finite_values() -> None:
    source = grads("autograd", w=t(1.0, -7.0, math.inf), b=t(math.nan, 2.0), h=t(100.0))
    assert largest_gradient(source, ["w", "b"]) == 7.0
    assert largest_gradient(source, ["missing"]) == 0.0
    assert largest_gradient(None, ["w"]) == 0.0


def test_a_ratio_above_one_is_outside_and_nan_is_never_inside() -> None:
    got = ratios(t(1.0, 3.0, 0.0, math.nan, math.inf), t(2.0, 2.0, 0.0, 1.0, 1.0))
    assert got[:4].tolist() == [0.5, 1.5, 0.0, math.inf]
    assert float(got[4]) > 1


def test_an_infinite_difference_is_an_infinite_ratio() -> None:
    assert float(ratios(t(math.inf), t(1.0))) == math.inf


def test_a_difference_against_a_zero_allowance_is_infinite_or_huge_not_nan() -> None:
    assert float(ratios(t(1e-300), t(0.0))) > 1


# --- Sides of one tensor ------------------------------------------------------------------------------


def test_sides_are_flat_float64_on_the_cpu_with_the_reference_shape() -> None:
    numerical = grads("numerical", w=torch.zeros(2, 2, dtype=torch.float64))
    sides = Sides.of("w", numerical, torch.ones(2, 2, dtype=torch.float32), torch.full((4,), 2.0), None)
    assert sides.shape == (2, 2) and sides.size == 4
    assert sides.autograd is not None and sides.autograd.dtype == torch.float64 and sides.autograd.shape == (4,)
    assert sides.manual is not None and sides.manual.tolist() == [2.0] * 4
    assert sides.rounding_a.tolist() == [0.0] * 4 and sides.twin_a is None
    assert torch.equal(sides.subject, sides.autograd)


def test_sides_take_each_sources_rounding_and_twin_and_drop_a_wrongly_sized_one() -> None:
    numerical = grads("numerical", w=torch.zeros(3, dtype=torch.float64))
    noise = Rounding(
        allowance={"autograd": {"w": t(1e-6, 2e-6, 3e-6)}, "manual": {"w": t(1.0, 2.0)}},
        twin={"autograd": {"w": t(1.0, 2.0, 3.0)}, "manual": {"w": t(1.0)}},
        unresolved={},
    )
    sides = Sides.of("w", numerical, t(1.0, 2.0, 3.0), t(1.0, 2.0, 3.0), noise)
    assert sides.rounding_a.tolist() == [1e-6, 2e-6, 3e-6]
    assert sides.rounding_m.tolist() == [0.0, 0.0, 0.0]
    assert sides.twin_a is not None and sides.twin_a.tolist() == [1.0, 2.0, 3.0]
    assert sides.twin_m is None


def test_a_numpy_cases_sides_have_no_autograd_and_its_scale_is_manuals() -> None:
    numerical = grads("numerical", w=torch.zeros(2, dtype=torch.float64))
    sides = Sides.of("w", numerical, None, t(4.0, 5.0), None)
    assert sides.autograd is None and sides.twin_a is None
    assert sides.subject.tolist() == [4.0, 5.0]
    diff, allowed = sides.between(TOL64, 5.0)
    assert diff.tolist() == [0.0, 0.0] and allowed.tolist() == [1.0, 1.0]


def test_between_flags_a_wrong_element_and_passes_a_rounding_sized_one() -> None:
    numerical = grads("numerical", w=torch.zeros(3, dtype=torch.float64))
    autograd = t(1.0, 2.0, 3.0)
    manual = autograd + t(0.0, 1e-15, 1e-6)
    diff, allowed = Sides.of("w", numerical, autograd, manual, None).between(TOL64, 3.0)
    assert (ratios(diff, allowed) > 1).tolist() == [False, False, True]


# --- disputed: where manual and autograd disagree ------------------------------------------------------


def sampled(mask: list[bool]) -> Gradients:
    numerical = grads("numerical", w=torch.full((len(mask),), math.nan, dtype=torch.float64))
    numerical.checked["w"] = torch.tensor(mask)
    return numerical


def test_disputed_names_the_unestimated_elements_where_manual_and_autograd_disagree() -> None:
    numerical = sampled([True, False, False, False, False, False])
    autograd = grads("autograd", w=torch.ones(6, dtype=torch.float64))
    manual = grads("manual", w=t(9.0, 1.0, 2.0, 1.0, 5.0, 1.0))
    found = disputed(Evidence(numerical, autograd, manual, ["w"], TOL64))
    assert found["w"].tolist() == [2, 4]  # element 0 disagrees too, but is estimated already


def test_disputed_keeps_the_worst_up_to_the_limit_in_index_order() -> None:
    numerical = sampled([False] * 5)
    autograd = grads("autograd", w=torch.ones(5, dtype=torch.float64))
    manual = grads("manual", w=t(2.0, 9.0, 1.0, 5.0, 3.0))
    assert disputed(Evidence(numerical, autograd, manual, ["w"], TOL64), limit=2)["w"].tolist() == [1, 3]


def test_nothing_is_disputed_without_both_exact_sources_or_when_they_agree() -> None:
    numerical = sampled([False, False])
    autograd = grads("autograd", w=t(1.0, 2.0))
    assert disputed(Evidence(numerical, autograd, None, ["w"], TOL64)) == {}
    assert disputed(Evidence(numerical, autograd, grads("manual", w=t(1.0, 2.0)), ["w"], TOL64)) == {}


# --- the manual gradient against the reference's shape -------------------------------------------------


def reference(shape: tuple[int, ...]) -> Gradients:
    return grads("numerical", w=torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) + 1)


def test_a_manual_gradient_with_only_unit_dimensions_extra_is_reshaped() -> None:
    numerical = reference((3,))
    aligned = aligned_manual(grads("manual", w=torch.ones(1, 3)), ["w"], [], numerical, None)
    assert isinstance(aligned["w"], torch.Tensor) and aligned["w"].shape == (3,)


def test_a_transposed_manual_gradient_is_a_mismatch_of_manual_that_says_so() -> None:
    numerical = reference((2, 3))
    transposed = numerical.values["w"].T.clone()
    found = aligned_manual(grads("manual", w=transposed), ["w"], [], numerical, None)["w"]
    assert isinstance(found, Check)
    assert (found.verdict, found.culprit, found.bad, found.size, found.ratio) == (Verdict.MISMATCH, Culprit.MANUAL, 6, 6, math.inf)
    assert found.note == "manual gradient has shape (3, 2), the transpose of (2, 3); transposed, it matches the reference"


def test_a_node_with_a_wrong_shape_is_a_node_check() -> None:
    numerical = grads("numerical", w=t(1.0), h=torch.ones(2, 3, dtype=torch.float64))
    found = aligned_manual(grads("manual", w=t(1.0), h=torch.ones(3, 2)), ["w"], ["h"], numerical, None)["h"]
    assert isinstance(found, Check) and found.kind == "node"


@pytest.mark.parametrize(
    "manual, message",
    [
        pytest.param({}, "the manual gradient misses parameter 'w'", id="missing"),
        pytest.param(
            {"W": t(1.0)},
            "the manual gradient misses parameter 'w' and returns 'W', which is neither a parameter nor a node (a typo?)",
            id="typo",
        ),
        pytest.param(
            {"w": t(1.0, 2.0, 3.0), "v": t(1.0)},
            "the manual gradient returns 'v', which is neither a parameter nor a node",
            id="unknown-name",
        ),
    ],
)
def test_a_manual_gradient_that_cannot_be_aligned_is_a_broken_case(manual: dict[str, torch.Tensor], message: str) -> None:
    numerical = reference((3,))
    with pytest.raises(CaseError) as raised:
        aligned_manual(grads("manual", **manual), ["w"], [], numerical, None)
    assert str(raised.value) == message


def test_a_wrong_shape_nothing_explains_is_still_a_slip_of_the_manual_gradient() -> None:
    found = aligned_manual(grads("manual", w=torch.ones(4)), ["w"], [], reference((3,)), None)["w"]
    assert isinstance(found, Check) and (found.verdict, found.culprit) == ("mismatch", "manual")
    assert found.note is not None and found.note.startswith("manual gradient has shape (4,), expected (3,)")


def test_a_wrong_shape_is_diagnosed_against_autograd_where_the_reference_is_sampled() -> None:
    numerical = grads("numerical", w=torch.full((2, 3), math.nan, dtype=torch.float64))
    autograd = reference((2, 3))
    transposed = autograd.values["w"].T.clone()
    found = aligned_manual(grads("manual", w=transposed), ["w"], [], numerical, autograd)["w"]
    assert isinstance(found, Check)
    assert found.note is not None and found.note.endswith("transposed, it matches the reference")


def test_no_manual_gradient_aligns_to_nothing() -> None:
    assert aligned_manual(None, ["w"], [], reference((3,)), None) == {}
