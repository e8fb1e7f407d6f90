"""The comparison: who is the odd one out, and derivation-shaped wrong shapes."""
from __future__ import annotations

import pytest
import torch

from backprop_check.engine.compare import _culprits, _name_of, shape_note

T, F = True, False


@pytest.mark.parametrize(
    "manual_ok, autograd_ok, manual_autograd_ok, expected",
    [
        pytest.param(T, T, T, None, id="all-agree"),
        pytest.param(F, T, F, "manual", id="manual-alone-disagrees"),
        pytest.param(T, F, F, "autograd", id="autograd-alone-disagrees"),
        pytest.param(F, F, T, "numerical", id="numerical-alone-disagrees"),
        pytest.param(F, F, F, "unknown", id="all-three-disagree"),
        pytest.param(T, T, F, "undecided", id="referee-too-coarse-to-tell"),
    ],
)
def test_culprit_table(manual_ok, autograd_ok, manual_autograd_ok, expected):
    code = _culprits(torch.tensor([manual_ok]), torch.tensor([autograd_ok]), torch.tensor([manual_autograd_ok]), has_manual=True)
    assert _name_of(int(code[0])) == expected


def test_two_way_checks_blame_autograd_when_the_referee_disagrees():
    ones = torch.tensor([True])
    code = _culprits(ones, torch.tensor([False]), ones, has_manual=False)
    assert _name_of(int(code[0])) == "autograd"


def test_a_transposed_matrix_gradient_is_recognised():
    reference = torch.arange(6.0).reshape(2, 3)
    assert "transpose" in shape_note(reference.T.clone(), reference)
    assert "it matches the reference" in shape_note(reference.T.clone(), reference)
    assert "it matches" not in shape_note(reference.T * 2, reference)


def test_a_missing_sum_over_the_batch_is_recognised():
    reference = torch.tensor([1.0, 2.0])
    per_sample = torch.tensor([[0.5, 1.0], [0.5, 1.0]])
    assert "missing sum over the batch" in shape_note(per_sample, reference)
    assert "summed over it, it matches" in shape_note(per_sample, reference)


def test_an_unexplainable_shape_gets_no_note():
    assert shape_note(torch.zeros(5), torch.zeros(2, 3)) is None


def test_a_missing_sum_over_a_kept_batch_dimension_is_recognised():
    reference = torch.tensor([[4.0], [8.0]])  # a column bias b1 of shape (6, 1), smaller
    per_column = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
    assert "missing sum over the batch" in shape_note(per_column, reference)
    assert "summed over it, it matches" in shape_note(per_column, reference)
