"""Function mode: `check(fn, inputs)` and `@function_case`, through the whole engine."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any
import warnings

import numpy as np
import pytest
import torch

import backprop_check as bc
import backprop_check.model.function  # noqa: F401 - bc.model.function below
from backprop_check.commands.cli import main
from backprop_check.formats import FORMATS

CORPUS = Path(__file__).resolve().parent / "corpus" / "functions.py"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_function.py"


def _corpus() -> Any:
    spec = importlib.util.spec_from_file_location("_function_corpus", CORPUS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUNCTIONS = _corpus()
pytest_plugins = ["pytester"]


def x64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def one(report: bc.Report, **where: str) -> list[bc.Result]:
    return [r for r in report.results if all(getattr(r, k) == v for k, v in where.items()) and r.verdict != "skipped"]


class IgnoresGradOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x


def test_a_backward_that_ignores_grad_output_passes_under_sum_but_not_here() -> None:
    x = x64(6)
    as_sum = bc.run(bc.case(lambda x: IgnoresGradOutput.apply(x).sum(), params={"x": x}), devices=["cpu"], points=1)
    assert as_sum.exit_code == 0  # the workaround the issue describes hides the bug
    report = bc.check(IgnoresGradOutput.apply, (x,), points=1)
    assert {(r.verdict, r.culprit) for r in report.results} == {("mismatch", "autograd")}
    assert "output 0 → x" in report.results[0].message


def test_inputs_are_named_by_the_functions_parameters() -> None:
    report = bc.check(lambda a, b: a * b, (x64(3), x64(3, seed=1)), dtypes=["float64"], points=0)
    assert report.exit_code == 0
    assert {c.name for c in report.results[0].checks if c.kind == "param"} == {"a", "b"}


def test_inputs_without_names_are_input0_input1() -> None:
    report = bc.check(torch.mul, (x64(3), x64(3, seed=1)), dtypes=["float64"], points=0)
    assert report.exit_code == 0
    assert {c.name for c in report.results[0].checks if c.kind == "param"} == {"input0", "input1"}


def test_a_custom_functions_inputs_are_named_by_its_forward() -> None:
    assert bc.model.function.input_names(FUNCTIONS.ScaleTanh.apply, 2) == ("x", "w")
    assert bc.model.function.input_names(FUNCTIONS.RightRule.apply, 1) == ("x",)  # setup_context: no ctx


def test_only_inputs_that_require_grad_are_differentiated() -> None:
    x, w = x64(3), x64(3, seed=1).requires_grad_()
    report = bc.check(lambda x, w: x * w, (x, w), dtypes=["float64"], points=0)
    assert {c.name for c in report.results[0].checks if c.kind == "param"} == {"w"}


def test_constants_and_integer_inputs_pass_through() -> None:
    index = torch.tensor([2, 0])
    report = bc.check(lambda x, i, p: x[i] ** p, (x64(3), index, 3), dtypes=["float64"], points=1)
    assert report.exit_code == 0, report.results[0].message


def test_non_scalar_outputs_of_any_shape_are_checked_through_random_cotangents() -> None:
    def two(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ x.T, x.sum(0)

    report = bc.check(two, x64(3, 2), points=2)
    assert report.exit_code == 0
    assert all(r.points == 3 for r in report.results)


def test_a_wrong_output_and_input_are_named_in_the_users_terms() -> None:
    report = bc.check(FUNCTIONS.WrongOutput.apply, (x64(3, 4), x64(4, seed=1)), dtypes=["float64"])
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "output 1 → x" in result.message and "with respect to input `x`" in result.message
    assert [c.name for c in result.checks if c.kind == "output"] == ["output 1 → x"]


def test_a_hand_written_vjp_is_the_third_source() -> None:
    def vjp(grad_outputs: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g0, g1 = grad_outputs
        return g0 * w + g1 * (1 - torch.tanh(x) ** 2), (g0 * x).sum(0)

    args = (x64(3, 4), x64(4, seed=1))
    assert bc.check(FUNCTIONS.ScaleTanh.apply, args, manual=vjp).exit_code == 0
    blamed = bc.check(FUNCTIONS.WrongInput.apply, args, manual=vjp, dtypes=["float64"])
    assert (blamed.results[0].verdict, blamed.results[0].culprit) == ("mismatch", "autograd")

    def wrong_vjp(grad_outputs: Any, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dx, dw = vjp(grad_outputs, x, w)
        return dx, 3 * dw

    manual = bc.check(FUNCTIONS.ScaleTanh.apply, args, manual=wrong_vjp, dtypes=["float64"])
    assert (manual.results[0].verdict, manual.results[0].culprit) == ("mismatch", "manual")
    assert "output 0 → w" in manual.results[0].message


def test_a_single_output_vjp_gets_a_tensor_not_a_tuple() -> None:
    seen = []

    def vjp(grad: Any, x: torch.Tensor) -> torch.Tensor:
        seen.append(type(grad))
        return grad * 3 * x**2

    assert bc.check(lambda x: x**3, x64(4), manual=vjp, dtypes=["float64"], points=0).exit_code == 0
    assert set(seen) == {torch.Tensor}


def test_float32_is_judged_fairly() -> None:
    report = bc.check(lambda x, w: torch.tanh(x @ w), (x64(16, 32), x64(32, 8, seed=1)), dtypes=["float32"], points=3)
    assert report.exit_code == 0, report.results[0].message


def test_a_large_input_is_checked_in_the_sampled_mode_and_a_wrong_element_found() -> None:
    class OneWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            g = grad * torch.cos(x)
            g.view(-1)[1234] *= 1.01
            return g

    report = bc.check(OneWrong.apply, x64(50, 60), dtypes=["float64"], points=0, contract=())
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "x[20, 34]" in result.message  # 1234 = 20·60 + 34


def test_devices_default_to_the_inputs_devices() -> None:
    case = bc.FunctionCase(torch.sin, x64(3))
    assert case.devices == ("cpu",)
    assert case.input_dtypes == ("float64",)


def _complex32() -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns that complex32 is experimental
        warnings.simplefilter("ignore")
        return torch.ones(2, dtype=torch.complex32)


@pytest.mark.parametrize(
    ("fn", "inputs", "says"),
    [
        pytest.param(lambda x: "nope", (x64(3),), "returned str, not a tensor", id="fn-returns-a-string"),
        pytest.param(lambda x: (x, 3), (x64(3),), "output 1 of", id="fn-returns-a-tuple-with-a-number"),
        pytest.param(lambda x: x, ([1.0, 2.0],), "is a list of numbers, not a tensor", id="input-is-a-list"),
        pytest.param(lambda x: x, (torch.ones(3).numpy(),), "numpy array", id="input-is-a-numpy-array"),
        pytest.param(lambda i: i * 2, (torch.arange(3),), "no input is a floating-point or complex tensor", id="only-integer-inputs"),
        pytest.param(lambda x: 1 / 0, (x64(3),), "raised ZeroDivisionError: division by zero", id="fn-raises"),
        pytest.param(lambda z: z * 2, (_complex32(),), "input `z` is complex32", id="complex32-input"),
        pytest.param(lambda x: torch.complex(x, x).to(torch.complex32), (x64(2),), "is complex32", id="complex32-output"),
    ],
)
def test_bad_input_is_one_line_and_an_error(fn: Any, inputs: Any, says: str) -> None:
    report = bc.check(fn, inputs)
    assert report.exit_code == 2
    assert all(r.verdict == "error" for r in report.results)
    message = report.results[0].message
    assert says in message and "\n" not in message and "Traceback" not in message


def test_an_integer_input_marked_to_be_differentiated_is_an_error() -> None:
    report = bc.check(lambda x, i: x * i, (x64(3), torch.arange(3)), wrt=("x", "i"))
    assert report.exit_code == 2
    assert "input `i` is an integer tensor (torch.int64) marked to be differentiated" in report.results[0].message


@pytest.mark.parametrize(
    ("vjp", "says"),
    [
        pytest.param(lambda g: g, "cannot be called as manual(grad_outputs, x, w)", id="wrong-arity"),
        pytest.param(lambda g, x, w: g * w, "returned 1 gradient for 2 inputs (x, w)", id="one-gradient-for-two-inputs"),
        pytest.param(lambda g, x, w: (g * w, None), "returned None for input `w`", id="none-for-a-differentiated-input"),
    ],
)
def test_a_broken_vjp_is_one_line_and_an_error(vjp: Any, says: str) -> None:
    report = bc.check(lambda x, w: x * w, (x64(3), x64(3, seed=1)), manual=vjp, dtypes=["float64"])
    (result,) = report.results
    assert result.verdict == "error"
    assert says in result.message and "\n" not in result.message


def test_a_vjp_of_the_wrong_shape_is_a_slip_of_the_manual_gradient() -> None:
    report = bc.check(lambda x, w: x * w, (x64(3), x64(3, seed=1)), manual=lambda g, x, w: (g * w, g[:2]), dtypes=["float64"])
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert "w: manual gradient has shape (2,), expected (3,)" in result.message


def test_one_broken_function_does_not_stop_the_others(tmp_path: Path) -> None:
    file = tmp_path / "checks.py"
    file.write_text(
        "import torch\nfrom backprop_check import function_case\n"
        "@function_case(inputs=(lambda g: torch.randn(3, generator=g, dtype=torch.float64),))\n"
        "def broken(x):\n    raise ValueError('boom')\n"
        "@function_case(inputs=(lambda g: torch.randn(3, generator=g, dtype=torch.float64),))\n"
        "def fine(x):\n    return torch.sin(x)\n"
    )
    report = bc.run([str(file)], devices=["cpu"])
    verdicts = {r.case: r.verdict for r in report.results}
    assert verdicts == {"broken": "error", "fine": "ok"}
    broken = next(r for r in report.results if r.case == "broken")
    assert "checks.py:" in broken.message and "broken raised ValueError: boom (line 5)" in broken.message


def test_the_example_case_file_runs_in_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(EXAMPLE), "--device", "cpu", "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    verdicts = {(r["case"], r["verdict"], r["culprit"]) for r in report["results"]}
    assert code == 1
    assert ("scaled_tanh", "ok", None) in verdicts
    assert ("scaled_tanh_forgot_grad_output", "mismatch", "autograd") in verdicts


def test_every_report_format_takes_a_function_check() -> None:
    report = bc.run([str(EXAMPLE)], devices=["cpu"], dtypes=["float64"])
    for name, render in FORMATS.items():
        assert "scaled_tanh" in render(report), name


def test_a_baseline_records_a_function_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    baseline = tmp_path / "gradients.json"
    main(["run", str(EXAMPLE), "-k", "scaled_tanh and not forgot", "--device", "cpu", "--baseline", str(baseline), "--update-baseline"])
    assert main(["run", str(EXAMPLE), "-k", "scaled_tanh and not forgot", "--device", "cpu", "--baseline", str(baseline)]) == 0
    stored = json.loads(baseline.read_text())
    assert "scaled_tanh" in json.dumps(stored)


def test_the_pytest_plugin_collects_function_checks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        checks="import torch\nfrom backprop_check import function_case\n"
        "@function_case(inputs=(lambda g: torch.randn(4, generator=g, dtype=torch.float64),))\n"
        "def sine(x):\n    return torch.sin(x)\n"
    )
    result = pytester.runpytest("checks.py", "--bc-device", "cpu", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*checks.py*"])


def test_a_numpy_input_to_check_points_to_the_numpy_ways_too() -> None:
    (result,) = bc.check(lambda x: 1 / (1 + np.exp(-x)), (np.ones(3),), dtypes=["float64"]).results
    assert result.verdict == "error" and "is a numpy array, not a tensor" in result.message
    assert "check_layer(forward, backward, inputs) or @case(numpy=True)" in result.message
