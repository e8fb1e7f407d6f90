"""The comparison: who is the odd one out (wrong shapes: test_shapes.py)."""
from __future__ import annotations

import pytest
import torch

from backprop_check.engine.compare import _culprits, _name_of

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
