"""Second order (`order=2`, double backward and a hand-written HVP) and forward mode
(`modes=("fwd",)`, jvp), in function mode and in case files."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.autograd.function import once_differentiable

import backprop_check as bc
from backprop_check.commands.cli import main

FILE = '''
import torch
from backprop_check import case

@case(params={"w": 0.5}, data={"x": 2.0, "y": 3.0}, order=2)
def cubic(w, x, y):
    return (w * x - y) ** 2 + w ** 4

@cubic.manual
def grad(w, x, y):
    return {"w": 2 * (w * x - y) * x + 4 * w ** 3}

@cubic.hvp
def hvp(u, w, x, y):
    return {"w": (2 * x * x + 12 * w ** %s) * u["w"]}
'''


def x64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def checked(report: bc.Report) -> dict[tuple[str, str], bc.Result]:
    return {(r.case, r.dtype): r for r in report.results if r.verdict != "skipped"}


class Square(torch.autograd.Function):
    """x², with a backward that is right (or detaches its saved x) and a jvp that is right (or
    has one wrong element)."""

    detach = False
    wrong_jvp_at: int | None = None

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x * x

    @classmethod
    def backward(cls, ctx, grad):  # noqa: ANN001, ANN206
        (x,) = ctx.saved_tensors
        return 2 * (x.detach() if cls.detach else x) * grad

    @classmethod
    def jvp(cls, ctx, tangent):  # noqa: ANN001, ANN206
        (x,) = ctx.saved_tensors
        factor = torch.ones_like(x)
        if cls.wrong_jvp_at is not None:
            factor.view(-1)[cls.wrong_jvp_at] = 1.001
        return 2 * x * tangent * factor


class Detached(Square):
    detach = True


class WrongJvp(Square):
    wrong_jvp_at = 3


class Once(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return grad * x.exp()


class NumpyBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return grad * torch.from_numpy(np.cos(x.detach().numpy()))


# --- second order --------------------------------------------------------------------------


def test_a_backward_that_detaches_a_saved_tensor_is_right_to_first_order_and_wrong_to_the_second() -> None:
    results = checked(bc.check(Detached.apply, (x64(5),), order=2, points=1))
    assert results[("Detached", "float64")].verdict == "ok"
    assert results[("Detached", "float32")].verdict == "ok"
    for dtype in ("float64", "float32"):
        second = results[("Detached (order 2)", dtype)]
        assert (second.verdict, second.culprit, second.order) == ("mismatch", "autograd", 2)
        assert "d(∇loss·u)/dx[" in second.message
        assert any(".detach()" in hint and "first order" in hint for hint in second.hints)


@pytest.mark.parametrize("fn", [Square.apply, torch.tanh, lambda x: (x.sin() * x).cumsum(0)], ids=["custom", "tanh", "cumsum"])
def test_a_correct_double_backward_is_ok_at_order_2_and_3_in_both_dtypes(fn) -> None:  # noqa: ANN001
    report = bc.check(fn, (x64(4),), order=3, points=2)
    orders = {(r.order, r.dtype): r.verdict for r in report.results if r.verdict != "skipped"}
    assert set(orders) == {(k, d) for k in (1, 2, 3) for d in ("float64", "float32")}
    assert set(orders.values()) == {"ok"}, report.results


@pytest.mark.parametrize("function", [Once.apply, NumpyBackward.apply], ids=["once_differentiable", "numpy"])
def test_a_backward_autograd_cannot_see_into_is_a_mismatch_at_order_2(function) -> None:  # noqa: ANN001
    results = checked(bc.check(function, (x64(4),), order=2, points=0, dtypes=["float64"]))
    name = function.__self__.__name__
    assert results[(name, "float64")].verdict == "ok"
    second = results[(f"{name} (order 2)", "float64")]
    assert (second.verdict, second.culprit) == ("mismatch", "autograd")
    if function.__self__ is Once:  # the decorator named, with the Function and its line
        assert "Once (backward at " in second.hints[0] and "decorated with @once_differentiable" in second.hints[0]
    else:
        assert "exactly zero" in second.hints[0] and "once_differentiable" in second.hints[0]


def test_order_2_of_a_function_checks_the_backward_against_its_grad_output_too() -> None:
    # fn(x) = x³ elementwise: the derived check differentiates Jᵀv with respect to x and v.
    report = bc.check(lambda x: x**3, (x64(3),), order=2, points=0, dtypes=["float64"])
    (second,) = [r for r in report.results if r.order == 2]
    names = {c.name for c in second.checks}
    assert {"x", "grad_output0"} <= names and second.verdict == "ok"


def test_an_op_without_a_second_derivative_is_one_line_naming_the_order() -> None:
    class NoDouble(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return Fails.apply(x) * grad

    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return 2 * x

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            raise RuntimeError("Fails has no double backward")

    report = bc.check(NoDouble.apply, (x64(3),), order=2, points=0, dtypes=["float64"])
    (second,) = [r for r in report.results if r.order == 2]
    assert second.verdict == "error" and "\n" not in second.message
    assert "order 1" in second.message and "Fails has no double backward" in second.message
    assert [r.verdict for r in report.results if r.order == 1] == ["ok"]


def test_a_hand_written_hvp_is_the_third_source_of_order_2(tmp_path: Path) -> None:
    right = tmp_path / "right.py"
    right.write_text(FILE % "2")
    results = checked(bc.run(right, points=2))
    assert {r.verdict for r in results.values()} == {"ok"}
    assert results[("cubic (order 2)", "float64")].checks[0].manual is not None
    wrong = tmp_path / "wrong.py"
    wrong.write_text(FILE % "3")  # 12·w³ for 12·w²
    results = checked(bc.run(wrong, points=2))
    assert results[("cubic", "float64")].verdict == "ok"
    second = results[("cubic (order 2)", "float64")]
    assert (second.verdict, second.culprit) == ("mismatch", "manual")
    assert "d(∇loss·u)/dw" in second.message


def test_a_module_case_is_checked_at_order_2_and_in_forward_mode(tmp_path: Path) -> None:
    path = tmp_path / "mlp.py"
    path.write_text(
        "import torch\nfrom backprop_check import case\n"
        "@case(module=lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)),\n"
        "      data={'X': lambda g: torch.randn(5, 3, generator=g, dtype=torch.float64)}, order=2, modes=('rev', 'fwd'))\n"
        "def mlp(model, X):\n    return model(X).pow(2).mean()\n"
    )
    results = checked(bc.run(path, points=1))
    assert {name for name, _ in results} == {"mlp", "mlp (fwd)", "mlp (order 2)", "mlp (order 2, fwd)"}
    assert {r.verdict for r in results.values()} == {"ok"}


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"order": 0}, "order=0: the order must be from 1"),
        ({"order": "2"}, "order= must be an integer"),
        ({"order": True}, "order= must be an integer"),
        ({"modes": ("bwd",)}, "modes= names 'bwd'"),
        ({"modes": ()}, "modes= must be a non-empty tuple"),
    ],
)
def test_a_bad_order_or_mode_is_one_line(options: dict, said: str) -> None:
    report = bc.check(torch.sin, (x64(3),), **options)
    assert {r.verdict for r in report.results} == {"error"}
    assert all(said in r.message and "\n" not in r.message for r in report.results)
    assert report.exit_code == 2


def test_a_numpy_case_cannot_ask_for_order_2(tmp_path: Path) -> None:
    path = tmp_path / "np_case.py"
    path.write_text(
        "from backprop_check import case\n"
        "@case(params={'w': 1.0}, numpy=True, order=2)\ndef sq(w):\n    return w * w\n"
        "@sq.manual\ndef g(w):\n    return {'w': 2 * w}\n"
    )
    report = bc.run(path)
    assert {r.verdict for r in report.results} == {"error"}
    assert "numpy" in report.results[0].message and "order" in report.results[0].message


# --- forward mode --------------------------------------------------------------------------


def test_a_wrong_jvp_beside_a_right_backward_is_a_mismatch_of_autograd_in_forward_mode() -> None:
    report = bc.check(WrongJvp.apply, (x64(6),), modes=("rev", "fwd"), points=1)
    results = checked(report)
    assert results[("WrongJvp", "float64")].verdict == "ok"
    for dtype in ("float64", "float32"):
        fwd = results[("WrongJvp (fwd)", dtype)]
        assert (fwd.verdict, fwd.culprit, fwd.mode) == ("mismatch", "autograd", "fwd")
        assert "forward mode (jvp) ∂/∂x[3] of output 0[3]" in fwd.message
    assert report.exit_code == 1


def test_a_wrong_jvp_element_of_a_large_input_is_found_by_bisection() -> None:
    report = bc.check(WrongJvp.apply, (x64(5000),), modes=("fwd",), points=0, dtypes=["float64"])
    (fwd,) = report.results
    assert (fwd.case, fwd.verdict, fwd.culprit) == ("WrongJvp (fwd)", "mismatch", "autograd")
    assert "∂/∂x[3] of output 0[3]" in fwd.message


def test_forward_mode_alone_runs_no_backward() -> None:
    class ForwardOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_forward(x)
            return x.exp()

        @staticmethod
        def jvp(ctx, tangent):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return x.exp() * tangent

    report = bc.check(ForwardOnly.apply, (x64(4),), modes=("fwd",))
    assert [(r.case, r.verdict) for r in report.results] == [("ForwardOnly (fwd)", "ok")] * 2


def test_forward_mode_has_no_false_alarm_on_an_mlp_in_float32() -> None:
    def mlp(x, W1, W2):  # noqa: ANN001, ANN202
        return torch.softmax(torch.tanh(x @ W1) @ W2, dim=-1)

    report = bc.check(mlp, (x64(8, 6, seed=1), x64(6, 16, seed=2) / 3, x64(16, 5, seed=3) / 4), modes=("fwd",), points=3)
    assert {r.verdict for r in report.results} == {"ok"}, [r.message for r in report.results]


def test_a_custom_function_without_a_jvp_is_one_line_in_forward_mode() -> None:
    report = bc.check(Once.apply, (x64(3),), modes=("fwd",), dtypes=["float64"])
    (result,) = report.results
    assert result.verdict == "error" and "\n" not in result.message
    assert result.case == "Once (fwd)" and "forward mode" in result.message and "jvp" in result.message
    assert result.message.startswith(__file__)  # the Function's file, not torch's


def test_forward_over_reverse_sees_a_detached_backward() -> None:
    report = bc.check(Detached.apply, (x64(4),), order=2, modes=("fwd",), points=0, dtypes=["float64"])
    results = checked(report)
    assert results[("Detached (fwd)", "float64")].verdict == "ok"
    second = results[("Detached (order 2, fwd)", "float64")]
    assert (second.verdict, second.culprit, second.mode, second.order) == ("mismatch", "autograd", "fwd", 2)


def test_modes_as_a_single_string_reads_as_that_mode() -> None:
    report = bc.check(torch.sin, (x64(3),), modes="fwd", dtypes=["float64"])
    assert [(r.case, r.verdict) for r in report.results] == [("sin (fwd)", "ok")]


def test_the_json_report_says_order_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.py"
    path.write_text(FILE % "2")
    out = tmp_path / "r.json"
    assert main(["run", str(path), "--dtype", "float64", "--format", "json", "--output", str(out)]) == 0
    rows = {(r["case"], r["order"], r["mode"]) for r in json.loads(out.read_text())["results"] if r["verdict"] != "skipped"}
    assert rows == {("cubic", 1, "rev"), ("cubic (order 2)", 2, "rev")}


class ComplexSquare(torch.autograd.Function):
    wrong_jvp = False

    @staticmethod
    def forward(ctx, z):  # noqa: ANN001, ANN205
        ctx.save_for_backward(z)
        ctx.save_for_forward(z)
        return z * z

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (z,) = ctx.saved_tensors
        return grad * (2 * z).conj()

    @classmethod
    def jvp(cls, ctx, tangent):  # noqa: ANN001, ANN206
        (z,) = ctx.saved_tensors
        return 2 * (z.conj() if cls.wrong_jvp else z) * tangent


class ComplexWrongJvp(ComplexSquare):
    wrong_jvp = True


def test_complex_inputs_and_outputs_are_checked_at_order_2_and_in_forward_mode() -> None:
    z = torch.randn(4, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    report = bc.check(ComplexSquare.apply, (z,), order=2, modes=("rev", "fwd"), points=1)
    assert {r.verdict for r in report.results if r.verdict != "skipped"} == {"ok"}
    assert len([r for r in report.results if r.verdict == "ok"]) == 8  # 2 orders × 2 modes × 2 dtypes
    report = bc.check(ComplexWrongJvp.apply, (z,), modes=("fwd",), points=0, dtypes=["float64"])
    (fwd,) = report.results
    assert (fwd.verdict, fwd.culprit) == ("mismatch", "autograd")
    assert ".imag of output 0[" in fwd.message or ".real of output 0[" in fwd.message


ROOT = Path(__file__).resolve().parent.parent


def test_the_second_order_example_shows_both_slips_and_only_them() -> None:
    results = checked(bc.run(ROOT / "examples" / "second_order.py", dtypes=["float64"]))
    verdicts = {name: (r.verdict, r.culprit) for (name, _), r in results.items()}
    assert verdicts == {
        "softplus": ("ok", None),
        "softplus (fwd)": ("mismatch", "autograd"),
        "softplus (order 2)": ("mismatch", "autograd"),
        "softplus (order 2, fwd)": ("mismatch", "autograd"),
    }
    assert "∂/∂x[" in results[("softplus (fwd)", "float64")].message
    assert "exactly zero" in results[("softplus (order 2)", "float64")].hints[0]
    assert len(results[("softplus (order 2)", "float64")].hints) == 1  # not also "nothing flows back"


def test_the_newton_cases_agree_three_ways_at_both_orders() -> None:
    report = bc.run([ROOT / "cases" / "newton.py", ROOT / "examples" / "newton.py"])
    results = checked(report)
    assert {name for name, _ in results} == {
        "linear_newton", "linear_newton (order 2)", "softplus_regression", "softplus_regression (order 2)"
    }
    assert report.exit_code == 0
    assert all(c.manual is not None for (name, _), r in results.items() if "order 2" in name for c in r.checks)


class ComplexDetached(ComplexSquare):
    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (z,) = ctx.saved_tensors
        return grad * (2 * z.detach()).conj()


def test_a_complex_backward_that_detaches_is_caught_at_order_2_with_the_element_in_complex_terms() -> None:
    z = torch.randn(3, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    report = bc.check(ComplexDetached.apply, (z,), order=2, points=1)
    results = checked(report)
    assert results[("ComplexDetached", "float64")].verdict == "ok"
    for dtype in ("float64", "float32"):
        second = results[("ComplexDetached (order 2)", dtype)]
        assert (second.verdict, second.culprit) == ("mismatch", "autograd")
        assert ".real" in second.message or ".imag" in second.message


class NanJvp(Square):
    @staticmethod
    def jvp(ctx, tangent):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        out = 2 * x * tangent
        out.view(-1)[1] = float("nan")
        return out


def test_a_jvp_that_returns_nan_is_a_mismatch_never_ok() -> None:
    for size in (4, 100):  # basis directions, and random directions bisected
        report = bc.check(NanJvp.apply, (x64(size),), modes=("fwd",), points=0, dtypes=["float64"])
        (fwd,) = report.results
        assert (fwd.verdict, fwd.culprit) == ("mismatch", "autograd"), fwd.message


def test_outputs_that_are_not_finite_are_one_error_line_in_forward_mode() -> None:
    report = bc.check(torch.log, (torch.tensor([1.0, -1.0], dtype=torch.float64),), modes=("fwd",), points=0, dtypes=["float64"])
    (fwd,) = report.results
    assert fwd.verdict == "error" and "\n" not in fwd.message
    assert "log (fwd)" in fwd.message and "not finite at the given point" in fwd.message and "nan" in fwd.message  # the guard reverse mode has


def test_forward_mode_refuses_a_forward_that_is_not_deterministic() -> None:
    def noisy(x):  # noqa: ANN001, ANN202
        return x * (1 + 1e-3 * torch.rand(()))

    report = bc.check(noisy, (x64(3),), modes=("fwd",), points=0, dtypes=["float64"])
    (fwd,) = report.results
    assert fwd.verdict == "error" and "not deterministic" in fwd.message


# --- order 2 of a Function vmap cannot batch -------------------------------------------------


class DetachedGrad(Square):
    """Right to first order; its backward detaches grad_output, so the double backward says
    that Jᵀv does not depend on v."""

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return 2 * x * grad.detach()


@pytest.mark.parametrize(
    ("function", "value"),
    [(Square.apply, x64(5)), (ComplexSquare.apply, torch.randn(3, dtype=torch.complex128, generator=torch.Generator().manual_seed(1)))],
    ids=["real", "complex"],
)
def test_order_2_of_a_function_vmap_cannot_batch_moves_its_cotangents_in_one_batched_backward(function, value) -> None:  # noqa: ANN001
    # L = ⟨u, Jᵀv⟩ is linear in v: the rows that move v alone are one forward and one backward
    # with is_grads_batched (numerical.Batched._split_linear), the same values as one by one.
    from backprop_check.engine.orders import orders
    from backprop_check.model.forward import call_forward
    from backprop_check.model.function import FunctionCase
    from backprop_check.model.points import given_point

    second = orders(FunctionCase(function, (value,), order=2), seed=0)[1]
    assert second.linear_names() == ("grad_output0",) and not second.batchable
    at = given_point(second, 0)
    v = at.params["grad_output0"]
    rows = torch.stack([v, 2 * v, torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(2))])
    batched = second.linear_rows(at, {"grad_output0": rows})
    one_by_one = [call_forward(second, replace(at, params={**at.params, "grad_output0": row}))[0] for row in rows]
    torch.testing.assert_close(batched, torch.stack(one_by_one).to(torch.float64), rtol=1e-12, atol=1e-14)


def test_a_backward_that_detaches_grad_output_is_caught_at_order_2_where_rows_of_v_are_batched(monkeypatch) -> None:  # noqa: ANN001
    from backprop_check.sources import numerical

    used = []
    split = numerical.Batched._split_linear
    monkeypatch.setattr(numerical.Batched, "_split_linear", lambda self, *a: used.append(1) or split(self, *a))
    results = checked(bc.check(DetachedGrad.apply, (x64(5),), order=2, points=0, dtypes=["float64"]))
    assert results[("DetachedGrad", "float64")].verdict == "ok"
    second = results[("DetachedGrad (order 2)", "float64")]
    assert (second.verdict, second.culprit) == ("mismatch", "autograd")
    assert "grad_output0" in second.message and used


def test_batched_rows_that_differ_from_a_plain_forward_are_not_used(monkeypatch) -> None:  # noqa: ANN001
    # A backward that vmap would batch wrongly must not corrupt the referee: two rows of every
    # batched call are checked against plain forward passes, and one by one it goes on.
    from backprop_check.engine.orders import Derivative

    right = Derivative.linear_rows
    monkeypatch.setattr(Derivative, "linear_rows", lambda self, at, rows: right(self, at, rows) * (1 + 1e-6))
    results = checked(bc.check(Square.apply, (x64(5),), order=2, points=0, dtypes=["float64"]))
    assert results[("Square (order 2)", "float64")].verdict == "ok"


def test_order_2_of_an_op_vmap_cannot_batch_evaluates_its_cotangent_rows_together(monkeypatch) -> None:  # noqa: ANN001
    # vmap refuses channels_last on its batched (rank 5) tensors: the referee loops, and the rows
    # that move v alone still go in one batched backward; a wrong double backward still fails.
    from backprop_check.sources import numerical

    used = []
    split = numerical.Batched._split_linear
    monkeypatch.setattr(numerical.Batched, "_split_linear", lambda self, *a: used.append(1) or split(self, *a))
    x = x64(2, 3, 2, 2).requires_grad_(True)
    assert bc.gradgradcheck(lambda t: (t * t).to(memory_format=torch.channels_last), (x,))
    assert used
    with pytest.raises(bc.GradcheckError, match="order 2"):
        bc.gradgradcheck(lambda t: DetachedGrad.apply(t).to(memory_format=torch.channels_last), (x,))


def test_the_order_2_loss_at_a_point_is_the_same_at_every_call() -> None:
    # torch.func.grad and plain autograd round group_norm's gradient differently at 1e3 (a few
    # ulps of the loss): the first call outside vmap, which learns that torch.func.grad works,
    # must still give plain autograd's value, or the forward-is-pure guard sees three calls
    # disagree and calls a deterministic forward random (op_db's group_norm at +1e3).
    from backprop_check.engine.orders import orders
    from backprop_check.model.forward import call_forward
    from backprop_check.model.function import FunctionCase
    from backprop_check.model.points import given_point

    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, dtype=torch.float64, generator=gen) * 5 + 1e3 for shape in ((1, 6, 3), (6,), (6,)))

    def norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, 2, w, b, eps=0.5)

    second = orders(FunctionCase(norm, (x, w, b), order=2), seed=0)[1]
    at = given_point(second, 0)
    losses = [float(call_forward(second, at)[0]) for _ in range(3)]
    assert losses[0] == losses[1] == losses[2]
    assert bc.gradgradcheck(norm, tuple(t.requires_grad_(True) for t in (x, w, b)))


def test_a_saved_intermediate_of_forward_is_named_where_order_2_is_zero() -> None:
    class SavesIntermediate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            d = x - 1.0
            ctx.save_for_backward(d)  # computed without a graph: a constant to the double backward
            return 0.5 * (d * d).sum()

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (d,) = ctx.saved_tensors
            return g * d

    x = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (result,) = [r for r in bc.check(SavesIntermediate.apply, (x,), order=2, dtypes=["float64"], points=0).results if r.verdict == "mismatch"]
    assert any("intermediates of forward saved" in hint for hint in result.hints), result.hints
