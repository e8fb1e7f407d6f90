"""Wrong shapes that a derivation slip explains: the slip, and whether undoing it fits."""
from __future__ import annotations

import pytest
import torch

from backprop_check.diagnosis.shapes import Slip, shape_slip

REFERENCE = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
BIAS = torch.tensor([1.0, 2.0], dtype=torch.float64)
COLUMN = torch.tensor([[4.0], [8.0]], dtype=torch.float64)  # a column bias b1 of shape (2, 1)


@pytest.mark.parametrize(
    ("value", "reference", "slip", "matches", "batch"),
    [
        pytest.param(REFERENCE.T.clone(), REFERENCE, Slip.TRANSPOSE, True, 1, id="transposed-matrix"),
        pytest.param(REFERENCE.T * 2, REFERENCE, Slip.TRANSPOSE, False, 1, id="transposed-shape-wrong-values"),
        pytest.param(torch.tensor([[0.5, 1.0], [0.5, 1.0]]), BIAS, Slip.SUM, True, 2, id="per-sample-bias-not-summed"),
        pytest.param(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), BIAS, Slip.MEAN, True, 2, id="per-sample-bias-not-averaged"),
        pytest.param(torch.tensor([[1.0, 3.0], [2.0, 6.0]]), COLUMN, Slip.SUM, True, 2, id="kept-batch-dimension-not-summed"),
        pytest.param(torch.tensor([[4.0, 4.0, 4.0], [8.0, 8.0, 8.0]]), COLUMN, Slip.MEAN, True, 3, id="kept-batch-dimension-not-averaged"),
        pytest.param(torch.tensor([[3.0, 2.0], [1.0, 9.0]]), BIAS, Slip.SUM, False, 2, id="batch-shape-wrong-values"),
    ],
)
def test_a_wrong_shape_names_its_slip(value, reference, slip, matches, batch):
    found = shape_slip(value, reference)
    assert found is not None
    assert (found.slip, found.matches, found.batch) == (slip, matches, batch)


def test_an_unexplainable_shape_is_still_a_slip_with_no_remedy():
    found = shape_slip(torch.zeros(5), torch.zeros(2, 3))
    assert found.slip == "other" and not found.matches and found.remedy("w") is None
    assert found.fact().startswith("manual gradient has shape (5,), expected (2, 3)")


def test_a_reference_with_unestimated_elements_never_matches():
    reference = REFERENCE.clone()
    reference[0, 1] = float("nan")
    assert not shape_slip(REFERENCE.T.clone(), reference).matches


@pytest.mark.parametrize(
    ("value", "reference", "fact"),
    [
        pytest.param(REFERENCE.T.clone(), REFERENCE, "manual gradient has shape (3, 2), the transpose of (2, 3); transposed, it matches the reference", id="transpose"),
        pytest.param(REFERENCE.T * 2, REFERENCE, "manual gradient has shape (3, 2), the transpose of (2, 3)", id="transpose-no-fit"),
        pytest.param(torch.tensor([[0.5, 1.0], [0.5, 1.0]]), BIAS, "manual gradient has shape (2, 2), expected (2,): a missing sum over the batch dimension; summed over it, it matches the reference", id="sum"),
        pytest.param(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), BIAS, "manual gradient has shape (2, 2), expected (2,): a missing mean over the batch dimension; averaged over it, it matches the reference", id="mean"),
    ],
)
def test_the_fact_states_the_shape_and_whether_undoing_the_slip_fits(value, reference, fact):
    assert shape_slip(value, reference).fact() == fact


def test_the_remedy_gives_the_rule_and_only_when_undoing_the_slip_fits():
    transposed = shape_slip(REFERENCE.T.clone(), REFERENCE)
    assert "multiply the chain for the manual dloss/dW in the other order" in transposed.remedy("W")
    assert shape_slip(REFERENCE.T * 2, REFERENCE).remedy("W") is None
    summed = shape_slip(torch.tensor([[0.5, 1.0], [0.5, 1.0]]), BIAS).remedy("b")
    assert summed == "b is shared by all 2 samples, so dloss/db is the sum of their per-sample shares"
    averaged = shape_slip(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), BIAS).remedy("b")
    assert averaged == "the loss is a mean over the 2 samples, so dloss/db is the mean of their per-sample shares"


def test_float32_values_match_within_float32s_hint_tolerance():
    value = (REFERENCE.T * (1 + 3e-4)).to(torch.float32)
    assert shape_slip(value, REFERENCE).matches
    assert not shape_slip(REFERENCE.T * (1 + 3e-4), REFERENCE).matches  # float64: 3e-4 is a real difference
