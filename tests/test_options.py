"""The run options, unit by unit: a Plan built directly and from parsed command-line values,
device and dtype lists, the one-line usage errors for bad values, and a numpy case's devices."""
from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace

import pytest

from backprop_check.errors import UsageError
from backprop_check.options import DEVICES, DTYPES, OPTIONS, POINTS, TIMEOUT, Plan, add_to_argparse, devices_for, plan_from


def parsed(*argv: str) -> Plan:
    parser = argparse.ArgumentParser()
    add_to_argparse(parser)
    args = parser.parse_args(list(argv))
    return plan_from(lambda name: getattr(args, name))


# --- a Plan built directly ---------------------------------------------------------------------


def test_the_default_plan() -> None:
    plan = Plan()
    assert (plan.devices, plan.dtypes, plan.points, plan.seed, plan.timeout) == (DEVICES, DTYPES, POINTS, 0, TIMEOUT)
    assert (plan.select, plan.full, plan.strict_devices, plan.progress) == (None, False, False, None)


@pytest.mark.parametrize("dtypes", [pytest.param(("float16", "bfloat16"), id="half-precisions"), pytest.param((), id="none")])
def test_a_plan_takes_every_dtype_of_the_table(dtypes: tuple[str, ...]) -> None:
    assert Plan(dtypes=dtypes).dtypes == dtypes


@pytest.mark.parametrize("devices", [pytest.param(("cuda:1",), id="indexed-cuda"), pytest.param(("mps", "cpu"), id="mps")])
def test_a_plan_takes_known_devices_with_an_index(devices: tuple[str, ...]) -> None:
    assert Plan(devices=devices).devices == devices


@pytest.mark.parametrize(
    "fields, message",
    [
        pytest.param({"dtypes": ("float64", "int8")}, "unknown dtype 'int8' (use float64, float32, float16, bfloat16)", id="unknown-dtype"),
        pytest.param({"dtypes": ("torch.float32",)}, "unknown dtype 'torch.float32'", id="torch-prefixed-dtype"),
        pytest.param({"devices": ("tpu",)}, "unknown device 'tpu' (use cpu or cuda)", id="unknown-device"),
        pytest.param({"timeout": 0.0}, "--timeout must be positive, got 0.0", id="zero-timeout"),
        pytest.param({"timeout": -1.0}, "--timeout must be positive, got -1.0", id="negative-timeout"),
        pytest.param({"points": -1}, "--points must be 0 or more, got -1", id="negative-points"),
        pytest.param({"select": "linear and ("}, "-k: cannot parse 'linear and ('", id="unparsable-selection"),
    ],
)
def test_a_bad_value_is_a_one_line_usage_error(fields: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        Plan(**fields)  # type: ignore[arg-type]
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_zero_points_and_no_timeout_are_allowed() -> None:
    plan = Plan(points=0, timeout=None)
    assert (plan.points, plan.timeout) == (0, None)


def test_the_progress_callback_is_left_out_of_equality() -> None:
    assert Plan(progress=lambda *_: None) == Plan()


# --- a Plan from the command line ---------------------------------------------------------------


def test_no_options_give_the_default_plan() -> None:
    assert parsed() == Plan()


def test_devices_and_dtypes_are_repeatable_and_comma_separated() -> None:
    plan = parsed("--device", "cpu, cuda", "--device", "mps", "--dtype", "float32,", "--dtype", " float16 ")
    assert plan.devices == ("cpu", "cuda", "mps")
    assert plan.dtypes == ("float32", "float16")


def test_devices_named_are_strict_unless_skips_are_allowed() -> None:
    assert parsed("--device", "cpu").strict_devices is True
    assert parsed("--device", "cpu", "--allow-skip").strict_devices is False
    assert parsed("--dtype", "float64").strict_devices is False


def test_numbers_and_flags_are_parsed() -> None:
    plan = parsed("--points", "5", "--seed", "7", "--timeout", "2.5", "--full")
    assert (plan.points, plan.seed, plan.timeout, plan.full) == (5, 7, 2.5, True)


def test_a_bad_dtype_on_the_command_line_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"^unknown dtype 'float8'"):
        parsed("--dtype", "float32,float8")


def test_a_number_option_given_a_word_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parsed("--points", "many")
    assert raised.value.code == 2
    assert "--points: invalid int value: 'many'" in capsys.readouterr().err


def test_the_selection_is_checked_when_the_plan_is_built() -> None:
    parser = argparse.ArgumentParser()
    add_to_argparse(parser)
    args = parser.parse_args([])
    assert plan_from(lambda name: getattr(args, name), select="mlp or linear").select == "mlp or linear"
    with pytest.raises(UsageError, match="^-k: cannot parse"):
        plan_from(lambda name: getattr(args, name), select="not")


def test_each_option_has_one_name_and_the_pytest_dest_follows_it() -> None:
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    assert next(o for o in OPTIONS if o.name == "allow-skip").dest == "allow_skip"


# --- a numpy case runs on the CPU ------------------------------------------------------------------


@pytest.mark.parametrize(
    "numpy, devices, expected",
    [
        pytest.param(False, ("cpu", "cuda"), ("cpu", "cuda"), id="a-torch-case-keeps-every-device"),
        pytest.param(True, ("cuda", "cpu"), ("cpu",), id="a-numpy-case-runs-on-the-cpu"),
        pytest.param(True, ("cuda",), ("cuda",), id="a-numpy-case-asked-for-cuda-only-keeps-it-to-be-skipped"),
    ],
)
def test_devices_for(numpy: bool, devices: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert devices_for(SimpleNamespace(numpy=numpy), devices) == expected


def test_the_options_import_no_torch() -> None:
    code = "import sys, backprop_check.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_the_python_api_may_name_dtypes_and_devices_as_torch_objects() -> None:
    import torch

    given = {"device": [torch.device("cpu")], "dtype": (torch.float32,), "points": 0, "seed": 0, "timeout": None,
             "full": False, "allow_skip": False}
    plan = plan_from(given.__getitem__)
    assert (plan.devices, plan.dtypes) == (("cpu",), ("float32",))
    with pytest.raises(UsageError, match="unknown dtype 'int64'"):
        plan_from({**given, "dtype": [torch.int64]}.__getitem__)
