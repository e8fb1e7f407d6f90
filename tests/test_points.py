"""Points: the given one as written, random ones seeded, integer data untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backprop_check import case
from backprop_check.model.points import given_point, random_point


@case(
    params={"w": 1, "W": [[1.0, 2.0], [3.0, 4.0]], "v": np.array([0.5, 0.25]), "g": lambda gen: torch.randn(3, generator=gen)},
    data={"x": 2.0, "labels": [1, 0, 1], "t": torch.tensor([1.5], dtype=torch.float32)},
)
def many(w, W, v, g, x, labels, t):
    return (w * W).sum() + v.sum() + g.sum() * x + t.sum() + labels.sum()


def test_the_given_point_keeps_values_and_makes_floats_float64():
    point = given_point(many, 0)
    assert point.params["w"].dtype == torch.float64 and float(point.params["w"]) == 1.0
    assert point.params["W"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert point.params["v"].tolist() == [0.5, 0.25]
    assert point.data["labels"].dtype == torch.int64
    assert point.data["t"].dtype == torch.float64 and point.data["t"].tolist() == [1.5]


def test_generator_params_are_seeded():
    assert torch.equal(given_point(many, 3).params["g"], given_point(many, 3).params["g"])
    assert not torch.equal(given_point(many, 3).params["g"], given_point(many, 4).params["g"])


def test_random_points_redraw_floats_keep_shapes_and_integer_data():
    given = given_point(many, 0)
    first = random_point(many, given, 1, seed=0)
    assert {k: v.shape for k, v in first.params.items()} == {k: v.shape for k, v in given.params.items()}
    assert not torch.equal(first.params["W"], given.params["W"])
    assert torch.equal(first.data["labels"], given.data["labels"])
    again = random_point(many, given, 1, seed=0)
    assert torch.equal(first.params["W"], again.params["W"]) and first.seed == again.seed
    assert random_point(many, given, 2, seed=0).seed != first.seed
    assert random_point(many, given, 1, seed=0, attempt=1).seed != first.seed


def test_a_float32_run_sees_the_rounded_point():
    @case(params={"w": 0.1})
    def tiny(w):
        return w

    point = given_point(tiny, 0)
    rounded = point.rounded(torch.float32)
    assert rounded.params["w"].dtype == torch.float64
    assert float(rounded.params["w"]) == float(torch.tensor(0.1, dtype=torch.float32))
    assert float(rounded.params["w"]) != 0.1


def test_sample_overrides_random_points():
    @case(params={"w": [1.0, 2.0]}, data={"x": 3.0}, sample=lambda g: {"x": torch.rand(1, generator=g).abs() + 1})
    def positive(w, x):
        return (w * torch.log(x)).sum()

    given = given_point(positive, 0)
    for index in range(1, 6):
        assert float(random_point(positive, given, index, seed=0).data["x"]) >= 1


def test_user_code_cannot_change_the_point_through_the_tensors_it_receives():
    @case(params={"w": [1.0, 2.0]}, data={"x": [3.0, 4.0]})
    def dot(w, x):
        return (w * x).sum()

    point = given_point(dot, 0)
    received = point.cast(torch.float64)
    received.params["w"].mul_(10)
    received.data["x"].zero_()
    assert point.params["w"].tolist() == [1.0, 2.0] and point.data["x"].tolist() == [3.0, 4.0]


@pytest.mark.parametrize("mode", ["rev", "fwd"])
@pytest.mark.parametrize(
    "fn", [torch.log, torch.sqrt, lambda p: torch.nn.functional.binary_cross_entropy(p / 2, torch.full_like(p, 0.3))],
    ids=["log", "sqrt", "probability"],
)
def test_random_points_outside_the_forwards_domain_are_drawn_within_the_given_range(fn, mode):
    # check(torch.log, positive inputs) was an error: its standard normal random points are
    # outside log's domain. They are drawn within the given values' range instead, with a note.
    import backprop_check as bc
    from backprop_check.engine.guards import DOMAIN_NOTE

    x = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    report = bc.check(fn, (x,), points=2, modes=(mode,))
    assert report.exit_code == 0, [r.message for r in report.results]
    assert all(DOMAIN_NOTE in r.notes for r in report.results)


def test_a_wrong_backward_is_still_found_at_random_points_drawn_within_the_given_range():
    # Wrong between 1.25 and 1.35 only, where no given value lies: the random points, drawn
    # within the given range (1.0 to 1.5) since log refuses standard normal ones, find it.
    import backprop_check as bc

    class Log(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x.log()

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return grad / x * torch.where((x > 1.25) & (x < 1.35), 1.01, 1.0)

    x = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.2 + 1.0
    x[3, 4] = 1.5
    report = bc.check(Log.apply, (x,), points=3, dtypes=["float64"])
    (result,) = report.results
    assert (str(result.verdict), str(result.culprit)) == ("mismatch", "autograd")
    assert "random point" in result.message
