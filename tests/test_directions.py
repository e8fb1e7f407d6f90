"""Random directions, unit by unit: one direction's verdict at the edge of its allowance, kinks
and non-finite estimates, which sources are projected, which directions fail, the worst
disagreement of a tensor (and whom it blames), and a flagged direction bisected to its element."""
from __future__ import annotations

import math

import pytest
import torch

from backprop_check import case
from backprop_check import check as bc_check
from backprop_check.engine.directions import Along, agreement, along_tensor, direction_verdict, failing_directions, sides_along
from backprop_check.engine.sides import Evidence, Sides
from backprop_check.engine.tolerance import ERROR_BARS, tolerance_for
from backprop_check.model.points import given_point
from backprop_check.records import Check, Culprit
from backprop_check.sources import Direction, Gradients
from backprop_check.sources.numerical import reference

TOL64 = tolerance_for(torch.float64)
G = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
U = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # G·U = 2


def along(value: float, error: float = 0.0, **fields: object) -> Direction:
    return Direction(U, value, error, fields.pop("kink", False), **fields)  # type: ignore[arg-type]


# --- one direction -----------------------------------------------------------------------------------


def test_a_direction_the_gradient_matches_agrees_and_gives_its_projection() -> None:
    ok, value, allowed = direction_verdict(along(2.0, 1e-10), G, None, TOL64)
    assert ok and value == 2.0
    assert allowed == pytest.approx(ERROR_BARS * 1e-10 + TOL64.along(G, U, None), rel=1e-12)


@pytest.mark.parametrize(
    "factor, agrees", [pytest.param(0.99, True, id="just-inside-agrees"), pytest.param(1.01, False, id="just-outside-disagrees")]
)
def test_a_direction_at_the_edge_of_its_allowance(factor: float, agrees: bool) -> None:
    _, _, allowed = direction_verdict(along(2.0, 1e-9), G, None, TOL64)
    ok, _, _ = direction_verdict(along(2.0 + factor * allowed, 1e-9), G, None, TOL64)
    assert ok is agrees


def test_as_a_detector_a_direction_has_no_rtol_and_as_a_verdict_it_has_the_elements() -> None:
    off = G * (1 + 5e-8)  # a uniform relative error within float64's rtol of 1e-7
    assert not direction_verdict(along(2.0), off, None, TOL64)[0]
    assert direction_verdict(along(2.0), off, None, TOL64, verdict=True)[0]
    assert not direction_verdict(along(2.0), G * (1 + 5e-7), None, TOL64, verdict=True)[0]


def test_a_float64_twin_as_a_verdict_is_held_to_float64s_rtol_not_the_run_dtypes() -> None:
    tol32 = tolerance_for(torch.float32)
    off = G * (1 + 1e-5)  # inside float32's rtol, far outside float64's
    assert direction_verdict(along(2.0), off, None, tol32, verdict=True)[0]
    assert not direction_verdict(along(2.0), off, None, tol32, exact=True, verdict=True)[0]


def test_on_a_kink_any_value_between_the_one_sided_derivatives_agrees() -> None:
    assert direction_verdict(along(0.0, kink=True, left=1.0, right=3.0), G, None, TOL64)[0]
    assert not direction_verdict(along(0.0, kink=True, left=2.5, right=3.0), G, None, TOL64)[0]


def test_a_non_finite_estimate_never_agrees() -> None:
    assert not direction_verdict(along(math.nan), G, None, TOL64)[0]
    assert not direction_verdict(along(math.inf), G, None, TOL64)[0]


# --- the sources projected -------------------------------------------------------------------------


def test_sides_along_projects_each_source_and_each_float64_twin() -> None:
    sides = Sides((3,), G, G + 1, torch.zeros(3, dtype=torch.float64), torch.full((3,), 1e-6, dtype=torch.float64), G, G + 1)
    projected = sides_along(sides)
    assert list(projected) == ["autograd", "manual", "autograd in float64", "manual in float64"]
    assert projected["autograd"][1] is None  # no rounding measured: the floor of ulps applies
    assert projected["manual"][1] is not None and projected["manual"][2] is False
    assert projected["manual in float64"][2] is True


def test_a_numpy_cases_sides_project_manual_alone() -> None:
    zeros = torch.zeros(3, dtype=torch.float64)
    assert list(sides_along(Sides((3,), None, G, zeros, zeros))) == ["manual"]


# --- the directions of one tensor -------------------------------------------------------------------


def sampled(*directions: Direction) -> Gradients:
    numerical = Gradients("numerical", {"w": torch.full((3,), math.nan, dtype=torch.float64)})
    numerical.directions["w"] = list(directions)
    return numerical


def test_only_the_directions_through_the_slip_fail_and_agrees_judges_any_other() -> None:
    clean = Direction(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 1.0, 1e-12, False)
    through = Direction(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), 5.0, 1e-12, False)
    numerical = sampled(clean, through)
    autograd = Gradients("autograd", {"w": G})
    manual = Gradients("manual", {"w": torch.tensor([1.0, 2.001, 3.0], dtype=torch.float64)})
    failing = failing_directions(Evidence(numerical, autograd, manual, ["w"], TOL64))
    assert [(name, d) for name, d, _ in failing] == [("w", through)]
    agrees = failing[0][2]
    assert agrees(clean) and not agrees(through)
    assert agreement("w", Evidence(numerical, autograd, None, ["w"], TOL64))(through)  # autograd alone agrees


def worst(numerical: Gradients, autograd: torch.Tensor | None, manual: torch.Tensor | None) -> Along:
    return along_tensor("w", numerical, Sides.of("w", numerical, autograd, manual, None), TOL64)


@pytest.mark.parametrize(
    "autograd, manual, culprit",
    [
        pytest.param(G, G * 1.01, Culprit.MANUAL, id="manual-off"),
        pytest.param(G * 1.01, G, Culprit.AUTOGRAD, id="autograd-off"),
        pytest.param(G * 1.01, G * 1.01, Culprit.NUMERICAL, id="both-off-together-blame-the-referee"),
        pytest.param(None, G * 1.01, Culprit.MANUAL, id="numpy-case-manual-off"),
        pytest.param(G * 1.01, None, Culprit.AUTOGRAD, id="no-manual-autograd-off"),
    ],
)
def test_the_worst_direction_blames_the_odd_source_out(autograd: torch.Tensor | None, manual: torch.Tensor | None, culprit: Culprit) -> None:
    found = worst(sampled(along(2.0, 1e-12)), autograd, manual)
    assert found.bad and found.culprit == culprit
    assert found.numerical == 2.0 and found.ratio > 1
    assert "no single one could be located" in found.note


def test_agreeing_directions_find_nothing() -> None:
    found = worst(sampled(along(2.0, 1e-12)), G, G)
    assert found == Along()


def test_the_worst_of_several_directions_is_kept() -> None:
    mild, strong = along(2.0 * 1.001, 1e-12), along(2.0 * 1.1, 1e-12)
    assert worst(sampled(mild, strong), G, G).numerical == pytest.approx(2.2)
    assert worst(sampled(strong, mild), G, G).numerical == pytest.approx(2.2)


def test_a_non_finite_direction_blames_no_one() -> None:
    found = worst(sampled(along(math.nan)), G, G)
    assert found.bad and found.culprit is None


def test_a_direction_on_a_kink_only_leads_the_bisection() -> None:
    # Several kinks at the point (relu at exact zeros, a pool over ties) add their one-sided
    # derivatives per side; the sum of a subgradient of each need not lie between the two sums.
    # Outside [5, 6] it still flags the direction for bisection, but is no verdict of its own.
    kinked = along(5.5, 1e-12, kink=True, left=5.0, right=6.0)
    assert not direction_verdict(kinked, G, None, TOL64)[0]
    assert not worst(sampled(kinked), G, G).bad


def test_a_mismatch_along_a_direction_fills_the_check() -> None:
    found = worst(sampled(along(2.0, 1e-12)), G, G * 1.01)
    check = found.mismatch(Check(name="w", kind="param", shape=(3,), verdict="mismatch"))
    assert (check.culprit, check.culprits, check.compared) == (Culprit.MANUAL, {Culprit.MANUAL: 1}, "along a random direction")
    assert check.manual == pytest.approx(2.02) and check.autograd == 2.0 and check.numerical == 2.0
    assert check.rel_err == pytest.approx(check.abs_err / 2.0) and check.note == found.note


# --- a flagged direction bisected to the element behind it -------------------------------------------


def test_a_flagged_direction_is_bisected_down_to_the_wrong_element() -> None:
    @case(params={"w": lambda gen: torch.randn(64, generator=gen, dtype=torch.float64)})
    def squares(w: torch.Tensor) -> torch.Tensor:
        return (w**2).sum() / 2

    point = given_point(squares, 0)
    numerical = reference(squares, point, torch.float64)
    assert numerical.gradients.directions["w"], "64 elements are checked by samples and directions"
    w = point.params["w"]
    slipped = w.clone()
    slipped[37] *= 1.01
    autograd, manual = Gradients("autograd", {"w": w}), Gradients("manual", {"w": slipped})
    failing = failing_directions(Evidence(numerical.gradients, autograd, manual, ["w"], TOL64))
    assert failing, "a direction through element 37 shows the slip"
    name, direction, agrees = failing[0]
    located = numerical.locate(name, direction, agrees)
    assert 37 in located.tolist() and located.numel() <= 8
    assert failing_directions(Evidence(numerical.gradients, autograd, Gradients("manual", {"w": w.clone()}), ["w"], TOL64)) == []


# --- a direction that crosses many near-ties (a sort) ------------------------------------------------


class _Sorted(torch.autograd.Function):
    """torch.sort's values, with a hand-written backward that may slip at one element."""

    @staticmethod
    def forward(ctx, x, factor):  # noqa: ANN001, ANN205
        values, order = torch.sort(x)
        ctx.save_for_backward(order)
        ctx.factor = factor
        return values

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (order,) = ctx.saved_tensors
        out = torch.zeros_like(grad).scatter(0, order, grad)
        out[1500] = out[1500] * ctx.factor
        return out, None


def _near_ties(gap: float) -> torch.Tensor:
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1:200:2] = x[0:200:2] + gap  # a hundred pairs `gap` apart: every direction crosses some
    return x


def test_a_direction_across_many_near_ties_is_judged_closer_not_blamed_on_autograd() -> None:
    # The function is smooth at the point, but a direction moving every element crosses some of
    # its hundred near-ties at every step down to the kink step, on both sides: its one-sided
    # derivatives bound nothing (autograd -0.059 against [-0.512, -0.375] before). Estimated
    # again down to the smallest steps, it is smooth; a[45], within a step of its tie, is a kink.
    (result,) = bc_check(lambda a: _Sorted.apply(a, 1.0), (_near_ties(1e-13),), dtypes=["float64"], points=0).results
    assert result.verdict == "nondifferentiable", result.message
    (result,) = bc_check(lambda a: _Sorted.apply(a, 1.0), (_near_ties(1e-9),), dtypes=["float64"], points=0).results
    assert result.verdict == "ok", result.message


def test_a_slip_across_the_near_ties_is_still_located() -> None:
    (result,) = bc_check(lambda a: _Sorted.apply(a, 1.01), (_near_ties(1e-13),), dtypes=["float64"], points=0).results
    assert result.verdict == "mismatch" and "a[1500]" in result.message, result.message


# --- elements tied on a kink, moved together ---------------------------------------------------------


def _window_of_ties() -> torch.Tensor:
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, 0, :2, :2] = 1.5  # one pooling window of four equal values (pixels clipped, after a ReLU)
    return x


class _Pool(torch.autograd.Function):
    """2×2 max-pooling whose backward routes the gradient to the first maximum of a window, or
    (`every`) to every tied maximum: 4× the true gradient over a window of four equal values."""

    @staticmethod
    def forward(ctx, x, every):  # noqa: ANN001, ANN205
        out, where = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
        ctx.save_for_backward(x, out, where)
        ctx.every = every
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, out, where = ctx.saved_tensors
        if ctx.every:
            up = out.repeat_interleave(2, 2).repeat_interleave(2, 3)
            return (x == up) * grad.repeat_interleave(2, 2).repeat_interleave(2, 3), None
        return torch.nn.functional.max_unpool2d(grad, where, 2, output_size=x.shape[-2:]), None


def test_a_gradient_routed_to_every_tied_maximum_is_caught_where_each_element_alone_passes() -> None:
    # Each tied element alone is a kink whose interval [0, v] holds v; moved together the window
    # is smooth (its max moves with them), and the four gradients must sum to v, not 4v.
    (result,) = bc_check(lambda a: _Pool.apply(a, True), (_window_of_ties(),), dtypes=["float64"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd"), result.message
    assert "along the tied elements a[0, 0, 0, 0], a[0, 0, 0, 1], a[0, 0, 1, 0], a[0, 0, 1, 1] moved together" in result.message
    (result,) = bc_check(lambda a: _Pool.apply(a, False), (_window_of_ties(),), dtypes=["float64"], points=0).results
    assert result.verdict == "nondifferentiable", result.message


@pytest.mark.parametrize(
    "fn",
    [
        lambda a: torch.nn.functional.max_pool2d(a, 2),
        lambda a: a.amax((2, 3)),
        lambda a: torch.relu(a - 1.5),
        lambda a: (a - 1.5).abs(),
        lambda a: a.reshape(4, 4).sort(1).values,
        lambda a: a.clamp(min=1.5),
    ],
    ids=["max-pool", "amax-splits-evenly", "relu-at-zeros", "abs-at-zeros", "sort-two-way-ties", "clamp-at-its-bound"],
)
def test_torch_at_a_tie_on_a_kink_is_no_mismatch(fn) -> None:
    (result,) = bc_check(fn, (_window_of_ties(),), dtypes=["float64"], points=0).results
    assert result.verdict in ("ok", "nondifferentiable"), result.message


class _Relu(torch.autograd.Function):
    """relu with a hand-written backward that may slip (×1.01) at one element."""

    @staticmethod
    def forward(ctx, x, at):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        ctx.at = at
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        out = grad * (x > 0)
        if ctx.at is not None:
            out[ctx.at] = out[ctx.at] * 1.01
        return out, None


def _a_third_zeros(seed: int) -> torch.Tensor:
    x = torch.randn(2000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[::3] = 0.0  # the output of an earlier ReLU: every random direction crosses hundreds of kinks at once
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_at_many_exact_zeros_is_nondifferentiable_and_a_slip_beside_them_is_found(seed: int) -> None:
    # Each zero is a kink; a random direction adds their one-sided derivatives per side, and
    # autograd's 0 at each need not sum to a value between the two sums: relu itself was a
    # mismatch at 2 of 2 seeds. The direction without the tied zeros is smooth, and judges.
    x = _a_third_zeros(seed)
    (result,) = bc_check(lambda a: _Relu.apply(a, None), (x,), dtypes=["float64"], points=0).results
    assert result.verdict == "nondifferentiable", result.message
    at = int((x > 0).nonzero()[5])
    (result,) = bc_check(lambda a: _Relu.apply(a, at), (x,), dtypes=["float64"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd"), result.message


def test_a_wrong_element_is_located_once_per_run_and_every_point_still_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bisection's estimates cost most of a failing check: they are made at the point whose
    failure is shown (the first), not again at every later point, which its disagreeing
    directions already fail."""
    from backprop_check.sources.numerical import Reference

    located = []
    locate = Reference.locate

    def counted(self, name, direction, agrees):  # noqa: ANN001, ANN202
        located.append(name)
        return locate(self, name, direction, agrees)

    monkeypatch.setattr(Reference, "locate", counted)

    class Slipped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            out = grad * x.cos()
            out[5, 7] *= 1.001
            return out

    x = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (result,) = bc_check(Slipped.apply, (x,), devices=["cpu"], dtypes=["float64"], points=2).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "x[5, 7]" in result.message and "3 of 3 points disagree" in result.message, result.message
    assert len(located) == 1, located


def test_the_bisection_never_names_an_element_held_fixed() -> None:
    """A -inf of an attention mask is held fixed (no finite step moves it): a bisection's half
    may hold such elements, and the one named was one of them, "numerical nan ± inf"."""

    class MaskedSoftmax(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bias):  # noqa: ANN001, ANN205
            p = torch.softmax(x + bias, dim=-1)
            ctx.save_for_backward(p)
            return p

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (p,) = ctx.saved_tensors
            dz = p * (grad - (grad * p).sum(-1, keepdim=True))
            return dz, dz / 4  # the bias's gradient scaled: a slip

    x = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(8, 8, dtype=torch.float64).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), -math.inf)
    (result,) = bc_check(MaskedSoftmax.apply, (x, bias), devices=["cpu"], dtypes=["float64"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    import re

    row, col = map(int, re.search(r"at bias\[(\d+), (\d+)\]", result.message).groups())
    assert math.isfinite(float(bias[row, col])) and "nan" not in result.message, result.message
