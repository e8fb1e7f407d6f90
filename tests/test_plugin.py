"""The pytest plugin, run for real in a temporary folder (pytester): collection and ids, failure
text, skip reasons, broken case files, shared options, one run per case, and xdist."""
from __future__ import annotations

import pytest

import backprop_check.engine.runner  # noqa: F401 - torch loads once, here: pytester's inline runs unload the modules they import
import backprop_check.commands.session

pytest_plugins = ["pytester"]

CASES = '''
from backprop_check import case


@case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
def linear(w, x, y):
    return (w * x - y) ** 2


@linear.manual
def linear_manual(w, x, y):
    return {"w": 2 * (w * x - y) * x}


@case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
def forgot_x(w, x, y):
    return (w * x - y) ** 2


@forgot_x.manual
def forgot_x_manual(w, x, y):
    return {"w": 2 * (w * x - y)}  # the chain rule's last factor, dŷ/dw = x, is missing
'''

FAST = ("--bc-points", "0", "-p", "no:cacheprovider")
CPU64 = ("--bc-device", "cpu", "--bc-dtype", "float64")


@pytest.fixture
def cases(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(**{"cases/models": CASES})
    return pytester


def test_each_case_device_and_dtype_is_an_item_with_a_readable_id(cases: pytest.Pytester) -> None:
    result = cases.runpytest("cases", "--collect-only", "-q", *FAST)
    ids = [line for line in result.outlines if "::" in line]
    assert ids == [
        f"cases/models.py::{name}[{device}-{dtype}]"
        for name in ("linear", "forgot_x")
        for device in ("cpu", "cuda")
        for dtype in ("float64", "float32")
    ]


def test_shared_options_limit_the_items(cases: pytest.Pytester) -> None:
    result = cases.runpytest("cases", "--collect-only", "-q", "--bc-dtype", "float64", "--bc-device", "cpu", *FAST)
    assert [line for line in result.outlines if "::" in line] == [
        "cases/models.py::linear[cpu-float64]",
        "cases/models.py::forgot_x[cpu-float64]",
    ]


def test_a_bad_shared_option_is_a_usage_error(cases: pytest.Pytester) -> None:
    result = cases.runpytest("cases", "--bc-dtype", "float8", *FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*backprop-check: unknown dtype 'float8'*"])


def test_a_failure_shows_the_table_and_the_culprit_not_a_traceback(cases: pytest.Pytester) -> None:
    result = cases.runpytest("cases", *CPU64, *FAST)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ forgot_x[[]cpu-float64[]] _*",
            "mismatch: manual is the odd one out",
            "case*run*param*manual*numerical*autograd*culprit",
            "forgot_x*cpu f64*w*2*6*6*mismatch manual",
            "*forgot_x[[]cpu-float64[]]: manual is the odd one out at the given point*",
            "FAILED cases/models.py::forgot_x[[]cpu-float64[]] - mismatch: manual*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    assert "session.py" not in result.stdout.str()


def test_an_unavailable_device_is_skipped_with_its_reason(cases: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backprop_check.commands.session, "device_unavailable", lambda device: "no GPU here" if device == "cuda" else None)
    result = cases.runpytest("cases", "-k", "linear", "--bc-dtype", "float64", "-rs", *FAST)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] cases/models.py:4: no GPU here"])


def test_a_broken_case_file_is_one_error_and_the_other_files_still_run(cases: pytest.Pytester) -> None:
    cases.makepyfile(**{"cases/broken": "from backprop_check import case\nraise RuntimeError('boom')\n"})
    result = cases.runpytest("cases", *CPU64, *FAST)
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*_ ERROR at setup of import _*", "cases/broken.py:2: import failed: RuntimeError: boom", "*short test summary*"])
    result.stdout.fnmatch_lines(["ERROR cases/broken.py::import - cases/broken.py:2: import failed: Runtime*"])
    assert "Traceback" not in result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_two_cases_of_one_name_in_two_files_are_flagged_as_the_cli_does(cases: pytest.Pytester) -> None:
    cases.makepyfile(**{"cases/more": CASES.split("@case(params={\"w\": 1.0}, data={\"x\": 3.0, \"y\": 2.0})\ndef forgot_x")[0]})
    result = cases.runpytest("cases", *CPU64, *FAST)
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(["*_ ERROR at setup of linear _*", "cases/more.py:*: two cases are named 'linear' (the other is at cases/models.py:*)"])


def test_ordinary_files_are_left_to_pytest(cases: pytest.Pytester) -> None:
    # A helper that does not use the package is never imported, even in a folder named on the
    # command line; nor is a test module inside a case folder taken for a case file.
    cases.makepyfile(**{"tests/helper": "raise RuntimeError('not a case file')\n"})
    cases.makepyfile(**{"tests/test_plain": "def test_plain():\n    assert True\n"})
    cases.makepyfile(**{"cases/test_inside": "def test_inside():\n    assert True\n"})
    result = cases.runpytest("tests", "cases/test_inside.py", *FAST)
    result.assert_outcomes(passed=2)


def test_case_files_in_any_folder_named_on_the_command_line_are_collected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**{"mycases/models": CASES, "mycases/deeper/more": CASES.replace("def linear", "def other").replace("@linear", "@other").replace("def forgot_x", "def forgot_y").replace("@forgot_x", "@forgot_y")})
    result = pytester.runpytest("mycases", "--collect-only", "-q", *CPU64, *FAST)
    assert [line for line in result.outlines if "::" in line] == [
        "mycases/deeper/more.py::other[cpu-float64]",
        "mycases/deeper/more.py::forgot_y[cpu-float64]",
        "mycases/models.py::linear[cpu-float64]",
        "mycases/models.py::forgot_x[cpu-float64]",
    ]


def test_a_plain_pytest_collects_only_the_ini_folders(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**{"mycases/models": CASES, "cases/models": CASES})
    pytester.makeini("[pytest]\ntestpaths = mycases cases\n")
    result = pytester.runpytest("--collect-only", "-q", *CPU64, *FAST)
    assert [line for line in result.outlines if "::" in line] == ["cases/models.py::linear[cpu-float64]", "cases/models.py::forgot_x[cpu-float64]"]


def test_a_device_asked_for_by_name_that_is_missing_fails(cases: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backprop_check.commands.session, "device_unavailable", lambda device: "no GPU here" if device == "cuda" else None)
    result = cases.runpytest("cases", "-k", "linear", "--bc-device", "cpu,cuda", "--bc-dtype", "float64", *FAST)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*_ linear[[]cuda-float64[]] _*", "--bc-device cuda was asked for, but no GPU here (--bc-allow-skip skips it instead)"])
    result = cases.runpytest("cases", "-k", "linear", "--bc-device", "cpu,cuda", "--bc-dtype", "float64", "--bc-allow-skip", *FAST)
    result.assert_outcomes(passed=1, skipped=1)


def test_an_ini_option_names_other_case_folders(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**{"gradients/models": CASES})
    pytester.makeini("[pytest]\nbackprop_check_paths = gradients\n")
    result = pytester.runpytest("gradients", "--collect-only", "-q", *CPU64, *FAST)
    assert "gradients/models.py::linear[cpu-float64]" in result.outlines


def test_a_case_file_named_on_the_command_line_is_collected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**{"elsewhere/models": CASES})
    result = pytester.runpytest("elsewhere/models.py", "--collect-only", "-q", *CPU64, *FAST)
    assert "elsewhere/models.py::forgot_x[cpu-float64]" in result.outlines


def test_each_case_runs_once_for_its_selected_runs(cases: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    check_case = backprop_check.commands.session.check_case

    def counting(case, plan, mode="rev"):  # noqa: ANN001, ANN202
        calls.append((case.name, plan.devices, plan.dtypes))
        return check_case(case, plan, mode)

    monkeypatch.setattr(backprop_check.commands.session, "check_case", counting)
    result = cases.runpytest("cases", "--bc-device", "cpu", "-k", "not float32", *FAST)
    result.assert_outcomes(passed=1, failed=1, deselected=2)
    assert calls == [("linear", ("cpu",), ("float64",)), ("forgot_x", ("cpu",), ("float64",))]


def test_the_header_says_what_is_checked(cases: pytest.Pytester) -> None:
    result = cases.runpytest("cases", "--collect-only", *CPU64, *FAST)
    result.stdout.fnmatch_lines(["backprop-check: cpu × float64, 0 random points, seed 0; case files under cases"])


def test_it_runs_under_xdist(cases: pytest.Pytester) -> None:
    result = cases.runpytest_subprocess("cases", "-n", "2", "--bc-device", "cpu", *FAST)
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["FAILED cases/models.py::forgot_x[[]cpu-float*[]] - mismatch: manual*"])


COUNTING = '''
import os
import sys

import backprop_check.commands.session

real = backprop_check.commands.session.check_case


def counting(case, plan, mode="rev"):
    with open(os.environ["CHECKED"], "a") as log:
        log.write(f"{case.name} {','.join(plan.dtypes)}\\n")
    return real(case, plan, mode)


backprop_check.commands.session.check_case = counting


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # xdist's controller
        with open(os.environ["CONTROLLER"], "w") as log:
            log.write(str("torch" in sys.modules))
'''


def test_under_xdist_each_case_is_checked_once_and_the_controller_never_imports_torch(
    cases: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases.makeconftest(COUNTING)
    cases.makepyfile(**{"cases/more": CASES.replace("def linear", "def other").replace("@linear", "@other").replace("def forgot_x", "def forgot_y").replace("@forgot_x", "@forgot_y")})
    monkeypatch.setenv("CHECKED", str(cases.path / "checked.log"))
    monkeypatch.setenv("CONTROLLER", str(cases.path / "controller.log"))
    # Three runs a case, so that xdist's `load` batches (4 items) would cut through cases.
    result = cases.runpytest_subprocess("cases", "-n", "2", "--bc-device", "cpu", "--bc-dtype", "float64,float32,bfloat16", *FAST)
    assert result.parseoutcomes()["passed"] + result.parseoutcomes()["failed"] == 12
    checked = (cases.path / "checked.log").read_text().splitlines()
    assert sorted(checked) == sorted(f"{name} float64,float32,bfloat16" for name in ("linear", "forgot_x", "other", "forgot_y"))
    assert (cases.path / "controller.log").read_text() == "False"


ORDERS = '''
import torch
from backprop_check import case, function_case


class Detached(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x.detach() * grad

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 2 * x * tangent


@function_case(inputs=(lambda g: torch.randn(3, generator=g, dtype=torch.float64),), order=2, modes=("rev", "fwd"))
def square(x):
    return Detached.apply(x)


@case(params={"w": 1.0}, data={"x": 3.0}, modes="fwd")
def forward_only(w, x):
    return (w * x) ** 2
'''


def test_order_and_modes_are_items_of_their_own_and_a_detached_backward_fails_at_order_2(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(**{"cases/orders": ORDERS})
    result = pytester.runpytest("-v", *FAST, *CPU64)
    result.stdout.fnmatch_lines(
        [
            "*::square[[]cpu-float64[]] PASSED*",
            "*::square (fwd)[[]cpu-float64[]] PASSED*",
            "*::square (order 2)[[]cpu-float64[]] FAILED*",
            "*::square (order 2, fwd)[[]cpu-float64[]] FAILED*",
            "*::forward_only (fwd)[[]cpu-float64[]] PASSED*",
        ]
    )
    result.assert_outcomes(passed=3, failed=2)
    assert "forward_only[cpu-float64]" not in result.stdout.str()  # modes="fwd": no reverse-mode item
