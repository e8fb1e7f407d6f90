"""Every report format parsed back: JUnit XML with a real XML parser, the Markdown table's rows,
the JSON round trip; and reports written atomically."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from backprop_check import Report, Result, case, run
from backprop_check.commands.cli import main
from backprop_check.formats import FORMATS, write

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


def test_a_regular_file_is_written_through_a_rename_that_leaves_only_the_file(tmp_path: Path) -> None:
    write(tmp_path / "report.xml", "<new/>")
    assert os.listdir(tmp_path) == ["report.xml"]
    assert (tmp_path / "report.xml").read_text() == "<new/>"


def test_an_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "report.xml").write_text("<old/>")
    with pytest.raises(TypeError):
        write(tmp_path / "report.xml", object())  # type: ignore[arg-type]  # fails mid-write
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


def test_a_new_report_gets_the_umask_mode_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write(tmp_path / "new" / "report.xml", "<new/>")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "report.xml").stat().st_mode & 0o777 == 0o644


def test_an_existing_report_keeps_its_mode(tmp_path: Path) -> None:
    (tmp_path / "report.xml").write_text("<old/>")
    (tmp_path / "report.xml").chmod(0o640)
    write(tmp_path / "report.xml", "<new/>")
    assert (tmp_path / "report.xml").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "report.xml").read_text() == "<new/>"


def test_a_symlink_stays_a_symlink_and_its_target_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "real.xml").write_text("<old/>")
    (tmp_path / "latest.xml").symlink_to("reports/real.xml")
    write(tmp_path / "latest.xml", "<new/>")
    assert (tmp_path / "latest.xml").is_symlink()
    assert (tmp_path / "reports" / "real.xml").read_text() == "<new/>"
    assert sorted(os.listdir(tmp_path / "reports")) == ["real.xml"]


def test_a_fifo_is_written_straight_and_stays_a_fifo(tmp_path: Path) -> None:
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()))
    reader.start()
    write(fifo, "<streamed/>")
    reader.join(timeout=10)
    assert read == ["<streamed/>"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["pipe"]


def test_a_device_is_written_straight_not_replaced(tmp_path: Path) -> None:
    import stat

    write("/dev/null", "<discarded/>")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_pipe_from_process_substitution_is_written(tmp_path: Path) -> None:
    # `--output >(cmd)` hands the tool /dev/fd/N, the write end of a pipe.
    readable, writable = os.pipe()
    try:
        write(f"/dev/fd/{writable}", "<piped/>")
    finally:
        os.close(writable)
    with os.fdopen(readable) as stream:
        assert stream.read() == "<piped/>"


def test_dash_is_standard_output(capsys: pytest.CaptureFixture[str]) -> None:
    write("-", "<out/>")
    assert capsys.readouterr().out == "<out/>"


def test_the_cli_reports_through_a_symlink_and_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    (tmp_path / "linear.py").write_text(CASE_FILE)
    base = ["run", str(tmp_path / "linear.py"), "--points", "0", "--device", "cpu", "--dtype", "float64", "--format", "json"]
    (tmp_path / "real.json").write_text("")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert main([*base, "--output", str(tmp_path / "link.json")]) == 0
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real.json").read_text())["summary"]["ok"] == 1
    os.mkfifo(tmp_path / "pipe")
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append((tmp_path / "pipe").read_text()))
    reader.start()
    assert main([*base, "--output", str(tmp_path / "pipe")]) == 0
    reader.join(timeout=10)
    assert json.loads(read[0])["summary"]["ok"] == 1


def test_a_report_shows_why_nothing_was_checked_and_the_baselines_stale_entries() -> None:
    report = Report(results=[Result(case="linear", device="cuda", dtype="float64", verdict="skipped", message="CUDA is not available")])
    report.baseline = {"file": "gradients.json", "missing": ["new[cpu-float64]"], "stale": ["gone[cpu-float64]"], "drifted": [], "updated": False, "command": "…"}
    assert report.exit_code == 5
    content = json.loads(FORMATS["json"](report))
    assert content["summary"]["not_checked"] == "nothing was checked: all 1 results were skipped (CUDA is not available)"
    assert content["baseline"]["stale"] == ["gone[cpu-float64]"]
    suite = ET.fromstring(FORMATS["junit"](report)).find("testsuite")
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert (properties["exit_code"], properties["baseline.stale"], properties["baseline.missing"]) == ("5", "gone[cpu-float64]", "new[cpu-float64]")
    assert "baseline gradients.json: 1 entries stale, their case is gone: gone[cpu-float64]" in suite.find("system-out").text
    markdown = FORMATS["markdown"](report)
    assert markdown.startswith("### ❌ backprop-check failed\n\n**nothing was checked: all 1 results were skipped")
    assert "**baseline gradients.json: 1 results not in it: new[cpu-float64]**" in markdown


BROKEN_FILES = {
    "c01_syntax_error.py": "from backprop_check import case\n\n@case(params={'w': 1.0}\ndef c01(w):\n    return w\n",
    "c02_forward_raises.py": (
        "from backprop_check import case\n\n@case(params={'w': 1.0})\ndef c02(w):\n    raise ValueError('no')\n"
    ),
}


def test_a_broken_file_is_one_junit_error_per_run_here_named_as_pytest_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, source in BROKEN_FILES.items():
        (tmp_path / name).write_text(source)
    out = tmp_path / "junit.xml"
    assert main(["run", str(tmp_path), "--points", "0", "--format", "junit", "--output", str(out)]) == 2
    cases = {(c.get("classname"), c.get("name")): c for c in ET.parse(out).getroot().iter("testcase")}
    errors = sorted(key for key, c in cases.items() if c.find("error") is not None)
    skipped = sorted(key for key, c in cases.items() if c.find("skipped") is not None)
    # No CUDA here: its runs of a broken case are skipped, as every case's are (and as the plugin has it).
    assert errors == [
        ("c01_syntax_error", "import"),
        ("c02_forward_raises", "c02[cpu-float32]"),
        ("c02_forward_raises", "c02[cpu-float64]"),
    ]
    assert skipped == [("c02_forward_raises", "c02[cuda-float32]"), ("c02_forward_raises", "c02[cuda-float64]")]
    assert "CUDA is not available" in cases[("c02_forward_raises", "c02[cuda-float64]")].find("skipped").get("message")
