"""The command line in-process: exit codes (2 wins over 1), one-line messages, no traceback
unless asked, the JSON report's contract keys, --output, list, -k and usage errors."""
from __future__ import annotations

import json
import runpy
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import backprop_check
from backprop_check.commands.cli import main

CPU = ["--device", "cpu", "--points", "1"]

GOOD = """
@case(params={"w": [0.5, -1.0]}, data={"x": [2.0, 3.0]})
def good(w, x):
    return ((w * x) ** 2).sum()

@good.manual
def good_manual(w, x):
    return {"w": 2 * w * x * x}
"""

WRONG = """
@case(params={"v": [0.5, -1.0]}, data={"x": [2.0, 3.0]})
def wrong(v, x):
    return ((v * x) ** 2).sum()

@wrong.manual
def wrong_manual(v, x):
    return {"v": 2 * v * x}  # forgot one factor x
"""

BROKEN = """
@case(params={"u": 1.0})
def broken(u):
    return u.no_such_method()
"""

NAN = """
@case(params={"n": [1.0, 2.0]})
def nan_manual(n):
    return (n ** 2).sum()

@nan_manual.manual
def nan_manual_manual(n):
    return {"n": 2 * n * float("nan")}
"""

HANGS = """
import time

@case(params={"t": 1.0})
def hangs(t):
    for _ in range(2000):  # 20 s at most: a test must fail, not hang, if the limit breaks
        time.sleep(0.01)
"""


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An empty working folder; `write(name, *bodies)` adds a case file to it."""
    monkeypatch.chdir(tmp_path)

    def write(name: str, *bodies: str) -> str:
        source = "import torch\nfrom backprop_check import case\n" + "".join(textwrap.dedent(b) for b in bodies)
        (tmp_path / name).write_text(source)
        return name

    write.path = tmp_path
    return write


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"a.py": [GOOD]}, 0, id="all-ok-is-0"),
        pytest.param({"a.py": [GOOD, WRONG]}, 1, id="a-mismatch-is-1"),
        pytest.param({"a.py": [GOOD, BROKEN]}, 2, id="a-broken-case-is-2"),
        pytest.param({"a.py": [WRONG, BROKEN]}, 2, id="an-error-beats-a-mismatch-in-one-file"),
        pytest.param({"a.py": [BROKEN], "b.py": [WRONG]}, 2, id="an-error-beats-a-mismatch-in-a-later-file"),
        pytest.param({"a.py": ["def f(:\n"], "b.py": [WRONG]}, 2, id="a-syntax-error-beats-a-mismatch"),
    ],
)
def test_exit_status(folder, capsys, files, expected):
    for name, bodies in files.items():
        folder(name, *bodies)
    code, out, err = run_cli(capsys, "run", ".", *CPU)
    assert code == expected
    assert out.rstrip().endswith(f"(exit {expected})")


def test_a_broken_case_is_one_line_with_file_case_and_reason_and_no_traceback(folder, capsys):
    folder("cases.py", BROKEN, WRONG, GOOD)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--dtype", "float64")
    assert code == 2
    assert "Traceback" not in out + err
    (line,) = [text for text in out.splitlines() if text.startswith("! ")]
    assert line.startswith("! broken[cpu-float64]: cases.py:4: broken: forward raised AttributeError")
    # The other cases in the file still ran.
    assert "✗ wrong[cpu-float64]: manual is the odd one out" in out
    assert "1 ok, 1 mismatch, 1 error" in out


def test_traceback_shows_the_users_frame_only_when_asked(folder, capsys):
    folder("cases.py", BROKEN)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--dtype", "float64", "--traceback")
    assert code == 2
    assert "Traceback" not in out
    assert "--- broken[cpu-float64]" in err
    assert "Traceback (most recent call last)" in err
    assert 'cases.py", line 6, in broken' in err


def test_a_file_that_cannot_be_imported_is_one_line_naming_file_and_line(folder, capsys):
    folder("bad.py", "\n\nimport not_a_module_anywhere\n")
    folder("good.py", GOOD)
    code, out, err = run_cli(capsys, "run", ".", *CPU, "--dtype", "float64")
    assert code == 2
    assert "! bad.py:5: import failed: ModuleNotFoundError: No module named 'not_a_module_anywhere'" in out
    assert "Traceback" not in out + err
    assert "1 ok, 1 error" in out


def test_json_report_has_the_contract_keys_and_counts(folder, capsys):
    folder("cases.py", GOOD, WRONG, BROKEN, NAN)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--format", "json")
    assert code == 2
    report = json.loads(out, parse_constant=lambda token: pytest.fail(f"{token} is not JSON"))
    assert set(report) == {"results", "summary"}
    for result in report["results"]:
        assert {"case", "device", "dtype", "verdict", "culprit", "message", "first_bad_node"} <= set(result)
        assert "\n" not in result["message"]
    verdicts = {(r["case"], r["dtype"]): (r["verdict"], r["culprit"]) for r in report["results"]}
    assert verdicts == {
        ("good", "float64"): ("ok", None),
        ("good", "float32"): ("ok", None),
        ("wrong", "float64"): ("mismatch", "manual"),
        ("wrong", "float32"): ("mismatch", "manual"),
        ("broken", "float64"): ("error", None),
        ("broken", "float32"): ("error", None),
        ("nan_manual", "float64"): ("mismatch", "manual"),
        ("nan_manual", "float32"): ("mismatch", "manual"),
    }
    summary = report["summary"]
    assert (summary["ok"], summary["mismatch"], summary["error"], summary["total"]) == (2, 4, 2, 8)
    assert summary["exit_code"] == 2


def test_output_writes_the_whole_report_and_the_console_names_each_failure_in_one_line(folder, capsys):
    folder("cases.py", GOOD, WRONG, BROKEN)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--format", "json", "--output", "reports/run.json")
    assert code == 2
    lines = out.splitlines()
    assert lines[0] == "6 results written to reports/run.json (exit 2)"
    assert [line.split(":")[0:2] for line in lines[1:]] == [
        ["mismatch", " wrong[cpu-float64] (cases.py"],
        ["mismatch", " wrong[cpu-float32] (cases.py"],
        ["error", " broken[cpu-float64] (cases.py"],
        ["error", " broken[cpu-float32] (cases.py"],
    ]
    assert lines[1].startswith("mismatch: wrong[cpu-float64] (cases.py:12): manual is the odd one out at the given point: dloss/dv[0]")
    report = json.loads((folder.path / "reports" / "run.json").read_text())
    assert (report["summary"]["ok"], report["summary"]["mismatch"], report["summary"]["error"]) == (2, 2, 2)
    assert [p.name for p in (folder.path / "reports").iterdir()] == ["run.json"]  # no temporary left


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        pytest.param(["--output", "taken/run.json"], "--output taken/run.json: cannot write there: Not a directory", id="output-below-a-file"),
        pytest.param(["--output", "reports"], "--output reports: cannot write there: it is a folder", id="output-is-a-folder"),
        pytest.param(["--baseline", "taken/gradients.json", "--update-baseline"], "--baseline taken/gradients.json: cannot write there", id="baseline-update"),
        pytest.param(["--baseline", "-"], "--baseline needs a file", id="baseline-is-stdout"),
    ],
)
def test_an_output_path_that_cannot_be_written_is_a_usage_error_before_the_run(folder, capsys, monkeypatch, argv, says):
    folder("cases.py", GOOD)
    (folder.path / "taken").write_text("a file, not a folder")
    (folder.path / "reports").mkdir()
    monkeypatch.setattr("backprop_check.commands.cli.run_plan", lambda *args: pytest.fail("the run started"))
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, *argv)
    assert code == 2
    assert err.startswith(f"backprop-check: error: {says}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_baseline_whose_obtained_file_cannot_be_written_is_a_usage_error(folder, capsys):
    folder("cases.py", GOOD)
    (folder.path / "taken").write_text("a file, not a folder")
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--baseline", "taken/gradients.json")
    assert code == 2
    assert err == "backprop-check: error: --baseline writes a drift's values to taken/gradients.obtained.json: cannot write there: Not a directory\n"


def test_trace_json_that_cannot_be_written_is_a_usage_error_before_the_replay(folder, capsys, monkeypatch):
    folder("cases.py", GOOD)
    (folder.path / "taken").write_text("a file, not a folder")
    monkeypatch.setattr("backprop_check.commands.trace.pick", lambda *args: pytest.fail("the replay started"))
    code, out, err = run_cli(capsys, "trace", "cases.py", "--epochs", "1", "--lr", "0.1", "--json", "taken/trace.json")
    assert code == 2
    assert err == "backprop-check: error: --json taken/trace.json: cannot write there: Not a directory\n"


def test_output_dash_is_standard_output(folder, capsys):
    folder("cases.py", GOOD)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--format", "json", "--output", "-")
    assert code == 0
    assert json.loads(out)["summary"]["ok"] == 2
    assert not (folder.path / "-").exists()


NOTHING = [
    pytest.param({"cases.py": [GOOD]}, ["-k", "godo"], "nothing was checked: the selection (-k) matches none of the 1 cases", id="a-k-typo"),
    pytest.param({"cases.py": ["x = 1\n"]}, [], "nothing was checked: no case is defined in cases.py (is @case missing?)", id="a-file-whose-case-was-lost"),
    pytest.param({}, [], "nothing was checked: no case file was found", id="an-empty-folder"),
]


@pytest.mark.parametrize(("files", "argv", "says"), NOTHING)
def test_nothing_checked_is_exit_5_with_one_line_saying_why(folder, capsys, files, argv, says):
    for name, bodies in files.items():
        folder(name, *bodies)
    code, out, err = run_cli(capsys, "run", ".", *CPU, *argv)
    assert code == 5
    assert err == f"backprop-check: {says}; --allow-empty accepts that\n"
    assert out.rstrip().endswith("(exit 5)")


@pytest.mark.parametrize(("files", "argv", "says"), NOTHING)
def test_allow_empty_restores_exit_0_when_nothing_was_checked(folder, capsys, files, argv, says):
    for name, bodies in files.items():
        folder(name, *bodies)
    code, out, err = run_cli(capsys, "run", ".", *CPU, *argv, "--allow-empty", "--format", "json")
    assert code == 0
    assert json.loads(out)["summary"]["not_checked"] is None


def test_nothing_checked_does_not_hide_a_broken_file(folder, capsys):
    folder("cases.py", "def f(:\n")
    code, out, err = run_cli(capsys, "run", ".", *CPU)
    assert code == 2


def no_cuda(monkeypatch):
    """A machine without the GPU that the user asked for."""
    unavailable = lambda device: "CUDA is not available (no driver)" if device.startswith("cuda") else None  # noqa: E731
    monkeypatch.setattr("backprop_check.engine.runner.device_unavailable", unavailable)


def test_a_device_asked_for_by_name_that_is_missing_fails_with_exit_5(folder, capsys, monkeypatch):
    no_cuda(monkeypatch)
    folder("cases.py", GOOD)
    code, out, err = run_cli(capsys, "run", "cases.py", "--device", "cuda", "--points", "0", "--format", "json")
    assert code == 5
    assert err == (
        "backprop-check: --device cuda was asked for, but CUDA is not available (no driver): 2 of 2 results not checked; "
        "--allow-skip skips it instead\n"
    )
    summary = json.loads(out)["summary"]
    assert (summary["skipped"], summary["exit_code"]) == (2, 5)
    # Also when another device was checked: the gate did not check all it was asked to.
    code, out, err = run_cli(capsys, "run", "cases.py", "--device", "cpu,cuda", "--points", "0")
    assert code == 5
    assert "2 of 4 results not checked" in err


def test_the_default_devices_still_skip_a_missing_cuda(folder, capsys, monkeypatch):
    no_cuda(monkeypatch)
    folder("cases.py", GOOD)
    code, out, err = run_cli(capsys, "run", "cases.py", "--points", "0")
    assert code == 0
    assert "2 ok, 2 skipped" in out and err == ""


def test_allow_skip_skips_a_missing_device_but_all_skipped_is_still_nothing_checked(folder, capsys, monkeypatch):
    no_cuda(monkeypatch)
    folder("cases.py", GOOD)
    assert run_cli(capsys, "run", "cases.py", "--device", "cpu,cuda", "--points", "0", "--allow-skip")[0] == 0
    code, out, err = run_cli(capsys, "run", "cases.py", "--device", "cuda", "--points", "0", "--allow-skip")
    assert code == 5
    assert err.startswith("backprop-check: nothing was checked: all 2 results were skipped (CUDA is not available (no driver))")
    assert run_cli(capsys, "run", "cases.py", "--device", "cuda", "--points", "0", "--allow-skip", "--allow-empty")[0] == 0


def test_a_mismatch_wins_over_nothing_checked_on_a_missing_device(folder, capsys, monkeypatch):
    no_cuda(monkeypatch)
    folder("cases.py", WRONG)
    code, out, err = run_cli(capsys, "run", "cases.py", "--device", "cpu,cuda", "--points", "0")
    assert code == 1
    assert "--device cuda was asked for" in err


def test_the_python_api_follows_the_same_exit_rule(folder, monkeypatch):
    no_cuda(monkeypatch)
    folder("cases.py", GOOD)
    assert backprop_check.run("cases.py", devices=["cuda"], points=0).exit_code == 5
    assert backprop_check.run("cases.py", devices=["cuda"], points=0, allow_skip=True, allow_empty=True).exit_code == 0
    assert backprop_check.run("cases.py", points=0).exit_code == 0
    assert backprop_check.run("cases.py", select="nothing", points=0).exit_code == 5


def interrupt_after(monkeypatch, checked: int) -> None:
    """Ctrl-C while the case after the first `checked` ones runs."""
    import backprop_check.engine.runner as runner

    real, calls = runner.check_case, []

    def check_case(case, plan, mode="rev"):
        calls.append(case.name)
        if len(calls) > checked:
            raise KeyboardInterrupt
        return real(case, plan, mode)

    monkeypatch.setattr(runner, "check_case", check_case)


@pytest.mark.parametrize(
    ("format", "partial"),
    [
        pytest.param("json", lambda text: json.loads(text)["summary"]["partial"] is True, id="json"),
        pytest.param("junit", lambda text: 'name="partial" value="true"' in text and "interrupted: a partial report" in text, id="junit"),
        pytest.param("markdown", lambda text: text.startswith("### ⏹️ backprop-check interrupted: partial report (2 results)"), id="markdown"),
        pytest.param("text", lambda text: text.rstrip().endswith("(exit 130, interrupted: partial report)"), id="text"),
    ],
)
def test_ctrl_c_writes_the_partial_report_and_exits_130(folder, capsys, monkeypatch, format, partial):
    folder("cases.py", GOOD, WRONG)
    interrupt_after(monkeypatch, 1)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--format", format, "--output", "report.out")
    assert code == 130
    text = (folder.path / "report.out").read_text()
    assert partial(text)
    assert "good" in text and "wrong" not in text
    assert "interrupted; the report holds the 2 results computed so far" in err


def test_ctrl_c_during_an_update_leaves_the_baseline_as_it_was(folder, capsys, monkeypatch):
    folder("cases.py", GOOD, WRONG)
    assert run_cli(capsys, "run", "cases.py", *CPU, "--baseline", "gradients.json", "--update-baseline")[0] == 1
    before = (folder.path / "gradients.json").read_text()
    interrupt_after(monkeypatch, 1)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--baseline", "gradients.json", "--update-baseline", "--points", "2")
    assert code == 130
    assert "baseline gradients.json: not updated, the run was interrupted" in err
    assert (folder.path / "gradients.json").read_text() == before


def test_the_python_api_raises_a_keyboard_interrupt_that_carries_the_partial_report(folder, monkeypatch):
    folder("cases.py", GOOD, WRONG)
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        backprop_check.run("cases.py", devices=["cpu"], points=0)
    report = interrupted.value.report
    assert (report.partial, report.exit_code, [r.case for r in report.results]) == (True, 130, ["good", "good"])


def test_k_selects_cases_by_name(folder, capsys):
    folder("cases.py", GOOD, WRONG, BROKEN)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--format", "json", "-k", "good or wrong")
    assert code == 1
    assert {r["case"] for r in json.loads(out)["results"]} == {"good", "wrong"}
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--format", "json", "-k", "not wrong and not broken")
    assert code == 0
    assert {r["case"] for r in json.loads(out)["results"]} == {"good"}


def test_timeout_reports_a_hanging_case_and_runs_the_rest(folder, capsys):
    folder("cases.py", HANGS, GOOD)
    run_cli(capsys, "run", "cases.py", "-k", "good", *CPU)  # lazy imports, untimed
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--dtype", "float64", "--timeout", "2")
    assert code == 2
    assert "! hangs[cpu-float64]: cases.py:6: hangs: the case ran past its time limit of 2s (--timeout)" in out
    assert "1 ok, 1 error" in out


def test_list_names_every_case_and_how_it_is_checked(folder, capsys):
    folder("cases.py", GOOD, BROKEN)
    code, out, err = run_cli(capsys, "list", "cases.py")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows == [["good", "cases.py:4", "three-way", "w"], ["broken", "cases.py:12", "two-way", "u"]]
    code, out, err = run_cli(capsys, "list", "cases.py", "-k", "broken")
    assert [line.split()[0] for line in out.splitlines()] == ["broken"]


def test_list_reports_a_file_that_cannot_be_loaded_and_exits_2(folder, capsys):
    folder("good.py", GOOD)
    folder("bad.py", "raise RuntimeError('cannot set up')\n")
    code, out, err = run_cli(capsys, "list", ".")
    assert code == 2
    assert out.split()[0] == "good"
    assert err == "error: bad.py:3: import failed: RuntimeError: cannot set up\n"


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        pytest.param(["--dtype", "float8"], "unknown dtype 'float8'", id="dtype-float8"),
        pytest.param(["--dtype", "int64"], "unknown dtype 'int64'", id="dtype-int64"),
        pytest.param(["--device", "tpu"], "unknown device 'tpu'", id="device-tpu"),
        pytest.param(["--timeout", "0"], "--timeout must be positive", id="timeout-zero"),
        pytest.param(["--points", "-1"], "--points must be 0 or more", id="negative-points"),
        pytest.param(["-k", "good and ("], "-k: cannot parse 'good and ('", id="k-unbalanced"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(folder, capsys, argv, reason):
    folder("cases.py", GOOD)
    code, out, err = run_cli(capsys, "run", "cases.py", *argv)
    assert code == 2
    assert out == ""
    assert err == f"backprop-check: error: {err.split(': error: ', 1)[1]}"
    assert err.count("\n") == 1 and reason in err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["run", "--points", "many"], id="points-not-a-number"),
        pytest.param(["run", "--format", "xml"], id="unknown-format"),
        pytest.param(["run", "--no-such-option"], id="unknown-option"),
        pytest.param([], id="no-command"),
    ],
)
def test_argparse_errors_exit_2_without_a_traceback(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 2
    assert "backprop-check" in err and "error:" in err and "Traceback" not in err


def test_a_missing_path_is_an_error_and_the_other_paths_still_run(folder, capsys):
    folder("cases.py", GOOD)
    code, out, err = run_cli(capsys, "run", "missing.py", "cases.py", *CPU, "--format", "json")
    assert code == 2
    results = json.loads(out)["results"]
    assert [(r["case"], r["verdict"]) for r in results[:1]] == [("missing", "error")]
    assert results[0]["message"] == "missing.py: no such file or folder"
    assert {r["verdict"] for r in results[1:]} == {"ok"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's report")
def test_without_cuda_the_default_run_skips_it_and_still_exits_0(folder, capsys):
    folder("cases.py", GOOD)
    code, out, err = run_cli(capsys, "run", "cases.py", "--points", "1", "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert report["summary"]["skipped"] == 2 and report["summary"]["ok"] == 2
    skipped = [r for r in report["results"] if r["verdict"] == "skipped"]
    assert {r["device"] for r in skipped} == {"cuda"}
    assert "CUDA is not available" in skipped[0]["message"]


def test_python_dash_m_runs_the_same_command(folder, capsys, monkeypatch):
    folder("cases.py", WRONG)
    monkeypatch.setattr(sys, "argv", ["backprop_check", "run", "cases.py", *CPU, "--dtype", "float64"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(Path(backprop_check.__file__).with_name("__main__.py")), run_name="__main__")
    assert exited.value.code == 1
    assert "manual is the odd one out" in capsys.readouterr().out


def test_ctrl_c_while_torch_loads_writes_an_empty_partial_report_and_exits_130(folder, capsys, monkeypatch):
    import signal

    from backprop_check import console

    folder("cases.py", GOOD)
    real = console.load_cli

    def pressed_during_the_import():
        signal.raise_signal(signal.SIGINT)  # as if Ctrl-C came while torch imports
        return real()

    monkeypatch.setattr(console, "load_cli", pressed_during_the_import)
    code = console.main(["run", "cases.py", *CPU, "--format", "json", "--output", "report.json"])
    out, err = capsys.readouterr()
    assert code == 130
    assert "Traceback" not in err and "stopping once torch has loaded" in err and "nothing was checked" not in err
    report = json.loads((folder.path / "report.json").read_text())
    assert report["summary"]["partial"] is True and report["results"] == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back as it was


def test_the_console_script_and_python_m_start_at_the_front_door_that_holds_ctrl_c():
    root = Path(__file__).resolve().parents[1]
    assert 'backprop-check = "backprop_check.console:main"' in (root / "pyproject.toml").read_text()
    assert "backprop_check.console import main" in (root / "backprop_check" / "__main__.py").read_text()


def test_output_into_a_missing_folder_creates_it_and_the_help_says_so(folder, capsys):
    folder("cases.py", GOOD)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a missing folder on the way is created" in help_text
    assert run_cli(capsys, "run", "cases.py", *CPU, "--format", "json", "--output", "new/folder/report.json")[0] == 0
    assert json.loads((folder.path / "new" / "folder" / "report.json").read_text())["summary"]["ok"] == 2
