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
from backprop_check.cli import main

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


def test_output_writes_the_whole_report_even_with_broken_cases_and_says_so_in_one_line(folder, capsys):
    folder("cases.py", GOOD, WRONG, BROKEN)
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--format", "json", "--output", "reports/run.json")
    assert code == 2
    assert out == "6 results written to reports/run.json (exit 2)\n"
    report = json.loads((folder.path / "reports" / "run.json").read_text())
    assert (report["summary"]["ok"], report["summary"]["mismatch"], report["summary"]["error"]) == (2, 2, 2)
    assert [p.name for p in (folder.path / "reports").iterdir()] == ["run.json"]  # no temporary left


def test_a_report_that_cannot_be_written_is_a_usage_error(folder, capsys):
    folder("cases.py", GOOD)
    (folder.path / "taken").write_text("a file, not a folder")
    code, out, err = run_cli(capsys, "run", "cases.py", *CPU, "--output", "taken/run.json")
    assert code == 2
    assert err.startswith("backprop-check: error: cannot write the report to taken/run.json:")
    assert err.count("\n") == 1 and "Traceback" not in err


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
