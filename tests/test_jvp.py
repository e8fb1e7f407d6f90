"""Forward mode, unit by unit, on small hand-made cases: the tangents, forward-mode AD itself,
the judge of one element at the edge of its allowance, a custom Function whose `jvp` slips at
one element (named directly for a small input, by bisection of a random direction for a large
one), and the names forward mode's results take."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from backprop_check import case, gradcheck, run
from backprop_check.engine.jvp import (
    DIRECTIONS,
    ELEMENTWISE,
    Tangent,
    _Judge,
    _tangents,
    check_point,
    jvp,
    name_of,
    named,
)
from backprop_check.engine.tolerance import ERROR_BARS, tolerance_for
from backprop_check.errors import CaseError
from backprop_check.model.points import given_point
from backprop_check.records import Culprit, Result, Verdict
from backprop_check.sources.numerical import steps_for

TOL64 = tolerance_for(torch.float64)


def cube_case(size: int, slip: int | None = None, name: str = "cubes", vmap: bool = False) -> Any:
    """Σ w³ through a custom Function whose backward is right and whose jvp is right, or off
    by 1 % at element `slip`; with `vmap`, torch.func batches it (generate_vmap_rule)."""

    class Cube(torch.autograd.Function):
        generate_vmap_rule = vmap

        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x**3

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            (x,) = inputs
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)
            ctx.x = x

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return 3 * x**2 * grad

        @staticmethod
        def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors if vmap else (ctx.x,)
            scale = torch.ones_like(x)
            if slip is not None:
                scale.view(-1)[slip] = 1.01
            return 3 * x**2 * tangent * scale

    @case(params={"w": lambda gen: torch.rand(size, generator=gen, dtype=torch.float64) + 0.5}, name=name, modes=("fwd",))
    def cubes(w: torch.Tensor) -> torch.Tensor:
        return Cube.apply(w).sum()

    return cubes


# --- the tangents ----------------------------------------------------------------------------------


def test_a_small_input_gets_one_basis_tangent_per_element_of_its_step() -> None:
    point = given_point(cube_case(6), 0)
    tangents = _tangents(point, 0)
    steps = steps_for(point.params["w"])
    assert [tangent.element for tangent in tangents] == [("w", j) for j in range(6)]
    for j, tangent in enumerate(tangents):
        vector = tangent.vectors["w"]
        sign = -1.0 if j % 2 == 0 else 1.0  # every other one points down: a jvp must be linear in its tangent
        assert tangent.step == sign * float(steps[j]) and float(vector[j]) == tangent.step
        assert int(vector.count_nonzero()) == 1
        assert math.log2(abs(tangent.step)) == round(math.log2(abs(tangent.step)))  # a power of two: θ ± h is exact


def test_a_large_input_gets_random_sign_tangents_of_its_steps_repeatable_by_seed() -> None:
    point = given_point(cube_case(ELEMENTWISE + 10), 0)
    tangents = _tangents(point, 0)
    assert len(tangents) == DIRECTIONS
    assert all(tangent.element is None for tangent in tangents)
    steps = steps_for(point.params["w"])
    assert all(torch.equal(tangent.vectors["w"].abs(), steps) for tangent in tangents)
    again, other = _tangents(point, 0), _tangents(point, 1)
    assert all(torch.equal(a.vectors["w"], b.vectors["w"]) for a, b in zip(tangents, again))
    assert not all(torch.equal(a.vectors["w"], b.vectors["w"]) for a, b in zip(tangents, other))


def test_a_tangent_is_named_by_its_element_or_as_random() -> None:
    shapes = {"w": (2, 3)}
    assert Tangent({}, ("w", 4)).label(shapes) == "∂/∂w[1, 1]"
    assert Tangent({}).label(shapes) == "along a random direction u"
    assert Tangent({}, ("z", 3)).label({"z": (2, 2)}, frozenset({"z"})) == "∂/∂z[1].imag"


# --- forward-mode AD -----------------------------------------------------------------------------------


def test_jvp_is_the_derivative_along_the_tangent() -> None:
    @case(params={"w": [1.0, -2.0, 3.0]})
    def squares(w: torch.Tensor) -> torch.Tensor:
        return (w**2).sum()

    point = given_point(squares, 0)
    u = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    (value,) = jvp(squares, point, {"w": u})
    assert float(value) == pytest.approx(2 * (0.5 - 2.0 - 3.0))


def test_a_custom_functions_jvp_is_what_forward_mode_runs() -> None:
    point = given_point(cube_case(3, slip=1), 0)
    w = point.params["w"]
    basis = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    (value,) = jvp(cube_case(3, slip=1), point, {"w": basis})
    assert float(value) == pytest.approx(3 * float(w[1]) ** 2 * 1.01, rel=1e-12)


# --- the judge of one element ------------------------------------------------------------------------


def judged(dtype: torch.dtype, fwd: float, twin: float, n: float, e: float, **est: Any) -> Any:
    cubes = cube_case(3)
    tol = tolerance_for(dtype)
    judge = _Judge(cubes, given_point(cubes, 0), "cpu", dtype, tol)
    estimate = {
        "value": torch.tensor([n], dtype=torch.float64), "error": torch.tensor([e], dtype=torch.float64),
        "kink": torch.tensor([est.get("kink", False)]),
        "left": torch.tensor([est.get("left", math.nan)], dtype=torch.float64),
        "right": torch.tensor([est.get("right", math.nan)], dtype=torch.float64),
    }
    return judge._judged(0, Tangent({}), torch.tensor([fwd], dtype=torch.float64), torch.tensor([twin], dtype=torch.float64), estimate)


def test_the_judges_allowance_is_error_bars_rtol_atol_and_floor() -> None:
    finding = judged(torch.float64, 2.0, 2.0, 2.0, 1e-10)
    expected = ERROR_BARS * 1e-10 + 1e-7 * 2.0 + 1e-12 * 2.0 + TOL64.floor(2.0)
    assert float(finding.allowed[0]) == pytest.approx(expected, rel=1e-12)
    assert finding.run_ratio is None and finding.bad == 0


@pytest.mark.parametrize(
    "factor, bad", [pytest.param(0.99, 0, id="just-inside-agrees"), pytest.param(1.01, 1, id="just-outside-disagrees")]
)
def test_a_jvp_at_the_edge_of_its_allowance(factor: float, bad: int) -> None:
    allowed = float(judged(torch.float64, 2.0, 2.0, 2.0, 1e-10).allowed[0])
    off = 2.0 + factor * allowed
    assert judged(torch.float64, off, off, 2.0, 1e-10).bad == bad


def test_on_a_kink_a_jvp_between_the_one_sided_derivatives_agrees() -> None:
    assert judged(torch.float64, 1.5, 1.5, 0.0, 1e-10, kink=True, left=1.0, right=2.0).bad == 0
    assert judged(torch.float64, 2.5, 2.5, 0.0, 1e-10, kink=True, left=1.0, right=2.0).bad == 1


def test_a_non_finite_estimate_or_jvp_never_agrees() -> None:
    assert float(judged(torch.float64, 2.0, 2.0, math.nan, 0.0).ratio[0]) == math.inf
    assert float(judged(torch.float64, math.nan, math.nan, 2.0, 0.0).ratio[0]) == math.inf


def test_below_float64_the_run_dtypes_jvp_is_judged_against_its_float64_twin() -> None:
    honest = judged(torch.float32, 2.0 * (1 + 1e-6), 2.0, 2.0, 1e-10)
    assert honest.run_ratio is not None and honest.bad == 0
    wrong = judged(torch.float32, 2.0 * (1 + 1e-2), 2.0, 2.0, 1e-10)
    assert wrong.bad == 1 and float(wrong.ratio[0]) < 1  # the twin is right: only the float32 jvp is off


def test_a_loss_not_finite_at_the_point_is_a_broken_case() -> None:
    @case(params={"w": [1.0, 0.0]})
    def logs(w: torch.Tensor) -> torch.Tensor:
        return torch.log(w).sum()

    with pytest.raises(CaseError, match=r"^loss is not finite at the given point: no derivative of it can be checked"):
        _Judge(logs, given_point(logs, 0), "cpu", torch.float64, TOL64)


# --- a whole point: the slip named ----------------------------------------------------------------------


def test_a_right_jvp_is_ok() -> None:
    cubes = cube_case(6)
    (check,) = check_point(cubes, given_point(cubes, 0), "cpu", torch.float64, TOL64)
    assert (check.name, check.kind, check.verdict, check.bad) == ("jvp loss", "jvp", Verdict.OK, 0)
    assert check.coverage["directions"] == 6 and check.ratio < 1


def test_a_jvp_slip_in_a_small_input_is_named_by_its_basis_direction() -> None:
    cubes = cube_case(6, slip=4)
    (check,) = check_point(cubes, given_point(cubes, 0), "cpu", torch.float64, TOL64)
    assert (check.verdict, check.culprit, check.bad) == (Verdict.MISMATCH, Culprit.AUTOGRAD, 1)
    assert check.note is not None and check.note.startswith("forward mode (jvp) ∂/∂w[4] of loss: numerical ")
    assert check.compared == "autograd (fwd) against numerical"
    assert check.rel_err == pytest.approx(0.01, rel=1e-3)


def test_a_jvp_slip_in_a_large_input_is_bisected_down_to_its_element() -> None:
    cubes = cube_case(ELEMENTWISE + 34, slip=37)
    (check,) = check_point(cubes, given_point(cubes, 0), "cpu", torch.float64, TOL64)
    assert (check.verdict, check.culprit) == (Verdict.MISMATCH, Culprit.AUTOGRAD)
    assert check.note is not None and check.note.startswith("forward mode (jvp) ∂/∂w[37] of loss: ")


def test_a_right_jvp_of_a_large_input_is_ok_along_every_random_direction() -> None:
    cubes = cube_case(ELEMENTWISE + 34)
    (check,) = check_point(cubes, given_point(cubes, 0), "cpu", torch.float64, TOL64)
    assert check.verdict == Verdict.OK and check.coverage["directions"] == DIRECTIONS


# --- names ---------------------------------------------------------------------------------------------


def test_forward_modes_results_are_named_fwd() -> None:
    cubes = cube_case(3, name="cubes")
    assert name_of(cubes) == "cubes (fwd)"
    result = named(Result(case="cubes", device="cpu", dtype="float64", verdict="ok"), cubes)
    assert (result.case, result.mode) == ("cubes (fwd)", "fwd")


# --- float32 rounding in forward mode --------------------------------------------------------------------


def saturated(modes: tuple[str, ...]) -> Any:
    @case(params={"w": [0.5, 2.0]}, data={"x": [1.0, 3.0]}, modes=modes)
    def saturated(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w * x).sum()  # tanh(6): float32 keeps about two digits of 1 − tanh²

    return saturated


def test_reverse_mode_in_float32_excuses_the_rounding_of_a_saturated_tanh() -> None:
    (result,) = run(saturated(("rev",)), devices=["cpu"], dtypes=["float32"], points=0).results
    assert result.verdict == Verdict.OK, result.message


def test_forward_mode_in_float32_excuses_the_rounding_of_a_saturated_tanh() -> None:
    (result,) = run(saturated(("fwd",)), devices=["cpu"], dtypes=["float32"], points=0).results
    assert result.verdict == Verdict.OK, result.message


def test_a_jvp_slip_only_in_float32_is_still_a_mismatch_in_forward_mode() -> None:
    """The rounding measured at the point excuses what float32 does to correct code, never a
    slip of its own: a jvp 10 % off in float32 only (its float64 twin right) is a mismatch."""

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x**3

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            ctx.x = inputs[0]

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return 3 * ctx.x**2 * grad

        @staticmethod
        def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
            slip = 1.1 if ctx.x.dtype == torch.float32 else 1.0
            return 3 * ctx.x**2 * tangent * slip

    @case(params={"w": [0.7, 1.3, 0.9]}, modes=("fwd",))
    def float32_slip(w: torch.Tensor) -> torch.Tensor:
        return Cube.apply(w).sum()

    f64, f32 = run(float32_slip, devices=["cpu"], dtypes=["float64", "float32"], points=0).results
    assert f64.verdict == Verdict.OK, f64.message
    assert (f32.verdict, f32.culprit) == (Verdict.MISMATCH, "autograd"), f32.message


# --- what op_db's forward-mode samples found (benchmarks/opinfo.py --kind forward) --------------


def with_jvp(fn: Any, derivative: Any) -> Any:
    """fn as a forward-only Function whose jvp is `derivative(x) * t`."""

    class Elementwise(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return fn(x)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.save_for_forward(*inputs)

        @staticmethod
        def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            return derivative(ctx.saved_tensors[0]) * t

    return Elementwise.apply


FORWARD = {"check_forward_ad": True, "check_backward_ad": False, "check_undefined_grad": False}


def pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def test_an_output_that_rounds_at_eps_not_at_its_own_size_is_judged_by_that_rounding() -> None:
    # torch's ndtr(x) is 1 + erf(x/√2) over 2 near x = -5.4: its value, 3e-8, rounds at eps, and
    # smaller steps saw that rounding as kinks and settled on 0 where the jvp is 1.65e-7.
    x = torch.tensor([-5.4215280660, -4.8269849024, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(torch.special.ndtr, (x,), **FORWARD)
    # A slip there is judged as reverse mode judges it: against rtol and atol·(the largest
    # derivative, pdf(0.3)), so 1 % of 1.65e-7 is found.
    with pytest.raises(RuntimeError, match=r"∂/∂\w+\[0\]"):
        gradcheck(with_jvp(torch.special.ndtr, lambda x: pdf(x) * torch.tensor([1.01, 1, 1, 1], dtype=x.dtype)), (x,), **FORWARD)


def test_a_basis_direction_whose_outputs_are_flat_is_judged_by_the_outputs_scale() -> None:
    # ndtr(-30) is exactly 0 in float64, its jvp 1.5e-196: a tolerance relative to that one
    # direction's largest derivative (0) called it wrong; reverse mode's atol is relative to the
    # gradient's largest element (here 1, along x[1]), and so is forward mode's now.
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtr(x[:1]) + x[1:]

    x = torch.tensor([-30.0, 0.0], dtype=torch.float64, requires_grad=True)
    assert gradcheck(fn, (x,)) and gradcheck(fn, (x,), **FORWARD)
    ndtr = with_jvp(torch.special.ndtr, lambda x: pdf(x) + 1e-3)
    with pytest.raises(RuntimeError, match=r"∂/∂\w+\[0\]"):
        gradcheck(lambda x: ndtr(x[:1]) + x[1:], (x,), **FORWARD)


def test_a_staircase_finer_than_the_step_is_seen_in_forward_mode() -> None:
    # round(x, 3): at the first step its stairs look like a slope of 1; its jvp is 0, and right.
    x = torch.tensor([-3.3421745453, -1.5411692216, 0.47, 2.6850092102], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: torch.round(x, decimals=3), (x,), **FORWARD)
    with pytest.raises(RuntimeError, match="odd one out"):
        gradcheck(with_jvp(lambda x: torch.round(x, decimals=3), torch.ones_like), (x,), **FORWARD)


def test_forward_mode_holds_non_finite_inputs_fixed_and_takes_transposed_ones() -> None:
    mask = torch.tensor([[0.3, -math.inf, 1.0], [2.0, 0.1, -math.inf]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda m: m.softmax(-1), (mask,), **FORWARD)  # jvp and estimate along -inf were NaN
    transposed = torch.randn(4, 3, dtype=torch.float64).t().detach().requires_grad_()
    assert not transposed.is_contiguous() and gradcheck(torch.sin, (transposed,), **FORWARD)
    with pytest.raises(RuntimeError, match=r"∂/∂\w+\[1, 2\]"):
        slipped = with_jvp(torch.sin, lambda x: x.cos() * (1 + 1e-4 * (x == x[1, 2])))
        gradcheck(slipped, (transposed,), **FORWARD)


def test_sort_of_distinct_integers_along_random_directions_is_not_a_false_alarm() -> None:
    # op_db's sort sample: a permutation of 0…7999. Along a random direction of dyadic steps,
    # another element lands where one left at every step, and the estimate along that direction
    # reads 0 where the jvp is ±128; its two halves' estimates, summed, are the reference then.
    x = torch.randperm(8000, generator=torch.Generator().manual_seed(0)).to(torch.float64).requires_grad_()
    assert gradcheck(lambda x: torch.sort(x).values, (x,), **FORWARD)

    class SortSlip(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.sort(x).values

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.order = torch.sort(inputs[0]).indices

        @staticmethod
        def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            out = t[ctx.order].clone()
            out[4000] = out[4000] * 1.0001
            return out

    with pytest.raises(RuntimeError, match="odd one out"):
        gradcheck(SortSlip.apply, (x,), **FORWARD)


def test_a_label_input_that_jumps_at_the_point_does_not_widen_the_other_inputs_bars_in_forward_mode() -> None:
    # op_db's hinge_embedding_loss and cosine_embedding_loss with their ±1 labels y requiring
    # grad: off ±1 the loss takes another branch, so it jumps at the point when y moves. Measured
    # as rounding, that jump made every bar so wide that a jvp wrong by 1 % passed.
    x = torch.tensor([0.3, -0.4, 1.7, 0.2, -2.1, 0.8], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.hinge_embedding_loss(x, y, reduction="none")

    assert gradcheck(loss, (x, y), **FORWARD)

    class Slip(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss(x, y)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.save_for_forward(*inputs)

        @staticmethod
        def jvp(ctx: Any, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
            x, y = ctx.saved_tensors
            t = torch.where(y == 1, tx, torch.where(1 - x > 0, -tx, torch.zeros_like(tx)))
            return t * (1 + 0.01 * (torch.arange(t.numel()) == 0))

    with pytest.raises(RuntimeError, match=r"∂/∂x\[0\]"):
        gradcheck(Slip.apply, (x, y), **FORWARD)
    # Past ELEMENTWISE elements, random directions: one input tensor at a time, so that the
    # labels' jump makes their own directions kinks and hides nothing along x.
    big_x = torch.linspace(-2, 2, 40, dtype=torch.float64).requires_grad_()
    big_y = torch.tensor([1.0, -1.0] * 20, dtype=torch.float64, requires_grad=True)
    assert gradcheck(loss, (big_x, big_y), **FORWARD)
    with pytest.raises(RuntimeError, match=r"∂/∂x\[0\]"):
        gradcheck(Slip.apply, (big_x, big_y), **FORWARD)


def test_a_float32_jvp_that_underflows_is_not_a_false_alarm_in_forward_mode() -> None:
    # op_db's prod of 125 float32 numbers: its jvp, -5.9e-56 in float64, is 0 in float32. As in
    # reverse mode, no difference below float32's smallest normal number is a finding.
    x = torch.linspace(0.1, 0.9, 125, dtype=torch.float32).reshape(5, 5, 5).requires_grad_()
    assert gradcheck(torch.prod, (x,), **FORWARD)
    with pytest.raises(RuntimeError, match="odd one out"):
        gradcheck(with_jvp(torch.sin, lambda x: x.cos() * 1.01), (x,), **FORWARD)


@pytest.mark.parametrize(("slip", "batched"), [(None, True), (4, True), (None, False), (4, False)])
def test_jvps_batched_by_torch_func_are_judged_as_the_plain_ones(monkeypatch: pytest.MonkeyPatch, slip: int | None, batched: bool) -> None:
    # A small input's basis tangents go through torch.func.jvp under vmap in one call, checked
    # against plain forward-mode AD at the first and the last tangent; a batch that differs there
    # (a wrong vmap rule) is not used, and the jvps run one by one. Either way a slip is found.
    import backprop_check.engine.jvp as forward_mode

    plain, batches = [], []
    real_jvp, real_batch = forward_mode.jvp, forward_mode._vmapped_jvps

    def counted(*args: Any) -> Any:
        plain.append(1)
        return real_jvp(*args)

    def batch(*args: Any) -> Any:
        batches.append(1)
        found = real_batch(*args)
        return found if batched else tuple(t * 2 for t in found)

    monkeypatch.setattr(forward_mode, "jvp", counted)
    monkeypatch.setattr(forward_mode, "_vmapped_jvps", batch)
    cubes = cube_case(6, slip=slip, vmap=True)
    (check,) = check_point(cubes, given_point(cubes, 0), "cpu", torch.float64, TOL64)
    assert batches
    if slip is None:
        assert (check.verdict, check.bad) == (Verdict.OK, 0), check.note
    else:
        assert (check.verdict, check.culprit, check.bad) == (Verdict.MISMATCH, Culprit.AUTOGRAD, 1), check.note
        assert check.note is not None and check.note.startswith("forward mode (jvp) ∂/∂w[4] of loss: numerical ")
    if batched and slip is None:
        assert len(plain) == 2  # the two ends; the other four came from the batch
    if not batched:
        assert len(plain) >= 6


def test_a_time_limit_while_locating_a_wrong_direction_keeps_the_mismatch_found(monkeypatch: pytest.MonkeyPatch) -> None:
    # A large input's random direction disagrees (judged, halves and float64's rounding weighed);
    # a time limit that strikes while bisecting it down to its element must not lose the
    # mismatch: it stands, unlocated, with a note, as in reverse mode.
    from backprop_check.errors import CaseTimeout

    def late(self: Any, finding: Any) -> Any:
        raise CaseTimeout("cubes ran past its time limit of 1s (--timeout)")

    monkeypatch.setattr(_Judge, "bisect", late)
    cubes = cube_case(ELEMENTWISE + 34, slip=37)
    results = run(cubes, dtypes=["float64"], points=0).results
    (result,) = [r for r in results if r.device == "cpu"]
    assert (result.verdict, result.culprit) == (Verdict.MISMATCH, Culprit.AUTOGRAD), result.message
    assert any("time limit" in note and "stands" in note for note in result.notes), result.notes
