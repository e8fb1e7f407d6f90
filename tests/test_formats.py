"""Every report format parsed back: JUnit XML with a real XML parser, the Markdown table's rows,
the JSON round trip; and reports written atomically."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from backprop_check import Report, Result, case, run
from backprop_check.cli import main
from backprop_check.formats import FORMATS, write_atomic

CASE_FILE = '''
from backprop_check import case


@case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
def linear(w, x, y):
    return (w * x - y) ** 2


@linear.manual
def linear_manual(w, x, y):
    return {"w": 2 * (w * x - y) * x}
'''


def forgot_x():
    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
    def forgot_x(w, x, y):
        return (w * x - y) ** 2

    forgot_x.manual(lambda w, x, y: {"w": 2 * (w * x - y)})
    return forgot_x


def linear():
    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
    def linear(w, x, y):
        return (w * x - y) ** 2

    linear.manual(lambda w, x, y: {"w": 2 * (w * x - y) * x})
    return linear


@pytest.fixture(scope="module")
def report() -> Report:
    """One ok, one mismatch (manual forgot x), one broken case and one skipped run."""
    checked = run([linear(), forgot_x()], devices=["cpu"], dtypes=["float64"], points=0)
    broken = Result(case="broken", device="cpu", dtype="float64", verdict="error", file="cases/broken.py", line=3,
                    message='cases/broken.py:3: broken: the loss is <nan> & "odd"\x1b[0m', traceback="Traceback: the rest")
    skipped = Result(case="linear", device="cuda", dtype="float64", verdict="skipped", message="CUDA is not available")
    return Report(results=[*checked.results, broken, skipped], seconds=0.5)


def test_junit_is_valid_xml_with_counts_names_and_failure_text(report: Report) -> None:
    root = ET.fromstring(FORMATS["junit"](report))
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite is not None
    assert {k: suite.get(k) for k in ("name", "tests", "failures", "errors", "skipped", "time")} == {
        "name": "backprop-check", "tests": "4", "failures": "1", "errors": "1", "skipped": "1", "time": "0.500",
    }
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["linear[cpu-float64]", "forgot_x[cpu-float64]", "broken[cpu-float64]", "linear[cuda-float64]"]
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("type") == "mismatch"
    assert failure.get("message", "").startswith("manual is the odd one out at the given point")
    assert "case" in failure.text and "culprit" in failure.text  # the table's header
    assert "mismatch manual" in failure.text
    error = cases[2].find("error")
    assert error is not None and '<nan> & "odd"' in error.get("message", "")
    assert "Traceback: the rest" in error.text
    assert cases[2].get("classname") == "broken" and cases[2].get("line") == "3"
    assert cases[3].find("skipped").get("message") == "CUDA is not available"
    assert cases[0].find("failure") is None and cases[0].find("error") is None


def test_markdown_counts_then_a_row_per_result_to_look_at(report: Report) -> None:
    lines = FORMATS["markdown"](report).splitlines()
    assert lines[0] == "### ❌ backprop-check failed"
    counts = lines.index("| ok | mismatch | nondifferentiable | error | skipped | total | exit |")
    assert lines[counts + 2] == "| 1 | 1 | 0 | 1 | 1 | 4 | 2 |"
    rows = [line for line in lines if line.startswith("| `")]
    mismatch = next(r for r in rows if r.startswith("| `forgot_x`"))
    cells = [cell.strip() for cell in mismatch.strip("|").split(" | ")]
    assert cells[:8] == ["`forgot_x`", "cpu float64", "❌ mismatch", "manual", "`w`", "2", "6", "6"]
    broken = next(r for r in rows if r.startswith("| `broken`"))
    assert "&lt;nan&gt; &amp;" in broken and len(broken.replace("\\|", "").split("|")) == 11
    assert "⏭️ 1 skipped: CUDA is not available" in lines


def test_markdown_folds_the_ok_results(report: Report) -> None:
    text = FORMATS["markdown"](report)
    folded = text[text.index("<details>") : text.index("</details>")]
    assert "<summary>1 ok</summary>" in folded and "| `linear` | cpu float64 |" in folded
    assert "forgot_x" not in folded


def test_json_round_trips(report: Report) -> None:
    assert json.loads(FORMATS["json"](report)) == json.loads(json.dumps(report.to_dict()))


def test_the_cli_writes_junit_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "linear.py").write_text(CASE_FILE)
    base = ["run", str(tmp_path / "linear.py"), "--points", "0", "--device", "cpu", "--dtype", "float64"]
    assert main([*base, "--format", "junit", "--output", str(tmp_path / "out" / "report.xml")]) == 0
    assert ET.parse(tmp_path / "out" / "report.xml").getroot().find("testsuite").get("tests") == "1"
    assert "1 results written to" in capsys.readouterr().out
    assert main([*base, "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("### ✅ backprop-check passed")


def test_write_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    write_atomic(tmp_path / "report.xml", "<new/>")
    assert os.listdir(tmp_path) == ["report.xml"]
    assert (tmp_path / "report.xml").read_text() == "<new/>"


def test_an_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "report.xml").write_text("<old/>")
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "report.xml", object())  # type: ignore[arg-type]  # fails mid-write
    assert os.listdir(tmp_path) == ["report.xml"]
    assert (tmp_path / "report.xml").read_text() == "<old/>"


def test_a_failing_render_keeps_the_old_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "linear.py").write_text(CASE_FILE)
    (tmp_path / "report.xml").write_text("<old/>")

    def broken(report: Report) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setitem(FORMATS, "junit", broken)
    with pytest.raises(RuntimeError):
        main(["run", str(tmp_path / "linear.py"), "--points", "0", "--device", "cpu", "--dtype", "float64",
              "--format", "junit", "--output", str(tmp_path / "report.xml")])
    assert (tmp_path / "report.xml").read_text() == "<old/>"
    assert sorted(os.listdir(tmp_path)) == ["linear.py", "report.xml"]
