"""Messages that point the right way: each slip a new user met, and what the report now says."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import backprop_check

from backprop_check import Result, case, node, run


def check(*cases, points: int = 3) -> list[Result]:  # noqa: ANN002
    return run(list(cases), devices=["cpu"], dtypes=["float64"], points=points).results


def test_a_wrong_published_value_is_the_odd_one_out() -> None:
    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0}, expect={"w": 7.0})
    def wrong_expect(w, x, y):
        return (w * x - y) ** 2

    wrong_expect.manual(lambda w, x, y: {"w": 2 * (w * x - y) * x})
    (result,) = check(wrong_expect)
    assert result.verdict == "mismatch"
    assert result.message.startswith("the published value (expect=) is the odd one out")
    assert "expected w = 7, the case gives 6" in result.message
    assert "no single one" not in result.message and "points disagree" not in result.message


def test_a_hard_coded_manual_gradient_is_called_so_without_a_factor_of_one() -> None:
    @case(params={"w": 0.5}, data={"x": 3.0, "y": 2.0})
    def hard_coded(w, x, y):
        return (w * x - y) ** 2

    hard_coded.manual(lambda w, x, y: {"w": -3.0})  # dloss/dw at the given point, written in
    (result,) = check(hard_coded)
    assert result.culprit == "manual"
    (hint,) = [h for h in result.hints if "given point" in h]
    assert "same value at every point" in hint and "compute it from the arguments" in hint
    assert "nothing is 1" not in hint and "equals 1" not in hint


def test_a_factor_that_equals_one_at_the_given_point_is_still_named() -> None:
    @case(params={"w": 1.0}, data={"x": 1.0, "y": 2.0})
    def forgot_x(w, x, y):
        return (w * x - y) ** 2

    forgot_x.manual(lambda w, x, y: {"w": 2 * (w * x - y)})
    (result,) = check(forgot_x)
    assert any("x = 1" in h and "multiplied by x it matches" in h for h in result.hints), result.hints


def test_a_detached_gradient_is_zero_not_a_constant_factor() -> None:
    @case(params={"w": [1.0, 2.0]}, data={"x": [0.5, -1.0]})
    def penalty_detached(w, x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((w * x**2).sum(), x)  # no create_graph=True: g is a constant
        return (g**2).sum()

    (result,) = check(penalty_detached)
    assert result.culprit == "autograd"
    (hint,) = [h for h in result.hints if "zero in every element" in h]
    assert "create_graph=True" in hint and "0×" not in hint and "constant factor" not in hint


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):  # noqa: ANN001, ANN205
        ctx.save_for_backward(z)
        return z**3

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (z,) = ctx.saved_tensors
        return grad * 2 * z**2  # the slip: d(z³)/dz is 3z²


@pytest.mark.parametrize("nodes", [pytest.param(True, id="between-named-nodes"), pytest.param(False, id="two-way-without-nodes")])
def test_autograd_the_culprit_names_the_custom_function_and_its_backward(nodes: bool) -> None:
    @case(params={"w": [0.5, -1.0, 1.5]}, data={"x": [1.0, 2.0, -0.5]})
    def cube(w, x):
        z = node("z", w * x) if nodes else w * x
        q = node("q", Cube.apply(z)) if nodes else Cube.apply(z)
        return (q**2).sum()

    (result,) = check(cube, points=0)
    assert result.culprit == "autograd"
    (hint,) = [h for h in result.hints if "custom torch.autograd.Function" in h]
    line = Cube.backward.__code__.co_firstlineno
    assert f"Cube (backward at {Path(__file__).relative_to(Path.cwd())}:{line})" in hint
    assert hint.endswith("check Cube.backward")
    assert "in the step where autograd goes wrong" in hint


def test_a_point_within_a_step_of_a_kink_is_not_called_non_differentiable_outright() -> None:
    # 1e-12: closer than the smallest step the referee takes (at 1e-7 the step shrinks below
    # the distance, and abs is checked as the differentiable function it is there).
    @case(params={"w": 1e-12})
    def abs_near_kink(w):
        return torch.abs(w)

    abs_near_kink.manual(lambda w: {"w": torch.sign(w)})
    (result,) = check(abs_near_kink, points=0)
    assert result.verdict == "nondifferentiable"
    assert "on a kink or within a finite-difference step of one" in result.message
    assert "move the given point farther than a step from the kink" in result.message
    assert "no single gradient exists" not in result.message


def test_a_sample_that_leaves_out_a_datum_says_which_one_is_redrawn() -> None:
    @case(params={"w": 1.0}, data={"x": 2.0}, sample=lambda g: {"w": torch.rand((), generator=g)})
    def log_x(w, x):
        return w * torch.log(x)

    log_x.manual(lambda w, x: {"w": torch.log(x)})
    (result,) = check(log_x)
    assert result.verdict == "error"
    assert "sample= leaves out 'x', so every random point draws it from a standard normal" in result.message
    assert "constrain random points with sample=" not in result.message


def test_a_manual_with_a_typo_lists_the_unexpected_key_beside_the_missing_one() -> None:
    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
    def typo(w, x, y):
        return (w * x - y) ** 2

    typo.manual(lambda w, x, y: {"W": 2 * (w * x - y) * x})
    (result,) = check(typo, points=0)
    assert "misses parameter 'w' and returns 'W', which is neither a parameter nor a node (a typo?)" in result.message


def test_a_gradient_penalty_needs_no_enable_grad_and_leaks_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    @case(params={"w": [1.0, 2.0]}, data={"x": [0.5, -1.0]})
    def gradient_penalty(w, x):
        x = x.clone().requires_grad_(True)
        out = (w * x).pow(2).sum()
        (g,) = torch.autograd.grad(out, x, create_graph=True)  # d out/dx = 2w²x
        return out + (g**2).sum()

    gradient_penalty.manual(lambda w, x: {"w": 2 * w * x**2 + 16 * w**3 * x**2})
    results = run(gradient_penalty, devices=["cpu"], points=2).results
    assert [r.verdict for r in results] == ["ok", "ok"], [r.message for r in results]
    assert [str(w.message) for w in recwarn.list if "requires_grad" in str(w.message)] == []


class _IgnoresGradOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return x.cos()  # grad_output forgotten


class _TwiceTheSine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return 2 * grad * x.cos()


def _inputs(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_a_backward_that_ignores_grad_output_is_said_in_the_text_report_and_the_gradcheck_error() -> None:
    from backprop_check import check, gradcheck
    from backprop_check.formats import text

    said = "the backward of _IgnoresGradOutput ignores grad_output of output 0"
    report = check(_IgnoresGradOutput.apply, (_inputs(3),), points=0, devices=["cpu"], dtypes=["float64"])
    assert said in " ".join(text.render(report).split())
    with pytest.raises(RuntimeError) as raised:
        gradcheck(_IgnoresGradOutput.apply, (_inputs(3),))
    assert said in " ".join(str(raised.value).split())


def test_a_float32_comparison_of_the_float64_twins_names_float64s_tolerance() -> None:
    from backprop_check import check

    (result,) = check(_TwiceTheSine.apply, (_inputs(3),), points=0, devices=["cpu"], dtypes=["float32"]).results
    assert "(float64's rtol 1e-07, atol 1e-12·max|grad|, for the float64 twins" in result.message
    assert "rtol 0.0001" not in result.message  # float32's: not what this error was measured against


def test_a_sampled_tensor_says_its_count_of_wrong_elements_is_a_lower_bound() -> None:
    from backprop_check import check

    (result,) = check(_TwiceTheSine.apply, (_inputs(140),), points=0, devices=["cpu"], dtypes=["float64"]).results
    assert result.checks[0].culprits == {"autograd": result.checks[0].bad} and result.checks[0].bad < 140
    assert f"at least {result.checks[0].bad} of 140 elements of `x` disagree (counted among the" in result.message


def test_where_every_comparison_is_exact_the_closest_call_names_an_input_not_a_contract_item():
    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.floor(x)

        @staticmethod
        def backward(ctx, g):
            return g * 0

    x = torch.tensor([1.3, 2.6], dtype=torch.float64, requires_grad=True)
    (result,) = backprop_check.check(Floor.apply, {"x": x}, dtypes=["float64"], points=0).results
    assert result.message.startswith("all agree; closest call x[0] at 0×"), result.message
