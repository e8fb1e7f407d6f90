"""Progress on a terminal while a run goes, and nothing of it anywhere else."""
from __future__ import annotations

import io

import pytest

from backprop_check import case
from backprop_check.commands.cli import main
from backprop_check.engine.runner import check_case
from backprop_check.options import Plan
from backprop_check.formats.terminal import MIN_WIDTH, WIDTH, Progress, style_for


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def linear():
    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
    def linear(w, x, y):
        return (w * x - y) ** 2

    return linear


def test_the_runner_reports_every_point_of_every_run_to_the_progress_hook() -> None:
    calls: list[tuple[str, str, str, int, int]] = []
    plan = Plan(devices=("cpu",), dtypes=("float64", "float32"), points=2, progress=lambda *call: calls.append(call))
    results = check_case(linear(), plan)
    assert [r.verdict for r in results] == ["ok", "ok"]
    assert calls == [
        ("linear", "cpu", "float64 reference", 1, 2),
        ("linear", "cpu", "float64 reference", 2, 2),
        *[("linear", "cpu", dtype, k, 3) for dtype in ("float64", "float32") for k in (1, 2, 3)],
    ]


def test_a_terminal_sees_the_case_run_point_and_elapsed_time_then_a_cleared_line() -> None:
    stream, ticks = Terminal(), iter([0.0, 0.5, 0.55, 2.0])
    progress = Progress(stream, clock=lambda: next(ticks))
    progress("linear", "cpu", "float32", 1, 4)
    progress("linear", "cpu", "float32", 2, 4)  # 0.05 s later: not redrawn
    progress("linear", "cpu", "float32", 3, 4)
    progress.close()
    written = stream.getvalue()
    assert written == (
        "\r\x1b[Kchecking linear on cpu float32: point 1 of 4 (0.5s)"
        "\r\x1b[Kchecking linear on cpu float32: point 3 of 4 (2.0s)"
        "\r\x1b[K"
    )


def test_a_stream_that_is_not_a_terminal_gets_no_progress() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    progress("linear", "cpu", "float64", 1, 4)
    progress.close()
    assert stream.getvalue() == ""


def test_the_cli_writes_no_progress_into_captured_stderr(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "cases.py"
    path.write_text("from backprop_check import case\n\n@case(params={'w': 1.0})\ndef square(w):\n    return w ** 2\n")
    assert main(["run", str(path), "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("columns, width", [
    pytest.param("80", 80, id="COLUMNS=80-gives-80"),
    pytest.param("132", 132, id="COLUMNS=132-gives-132"),
    pytest.param("wide", WIDTH, id="a-COLUMNS-that-is-no-number-is-ignored"),
    pytest.param("10", MIN_WIDTH, id="a-tiny-COLUMNS-still-gets-the-least-width"),
])
def test_a_pipe_follows_COLUMNS_as_shutil_get_terminal_size_does(
    monkeypatch: pytest.MonkeyPatch, columns: str, width: int
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    assert style_for(io.StringIO()).width == width


def test_the_cli_report_into_a_pipe_fits_COLUMNS(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path  # noqa: ANN001
) -> None:
    path = tmp_path / "cases.py"
    path.write_text(
        "from backprop_check import case\n\n"
        "@case(params={'w': 1.0}, data={'x': 3.0, 'y': 2.0})\n"
        "def slope(w, x, y):\n    return (w * x - y) ** 2\n\n"
        "@slope.manual\n"
        "def wrong(w, x, y):\n    return {'w': 2 * (w * x - y)}\n"
    )
    monkeypatch.setenv("COLUMNS", "72")
    assert main(["run", str(path), "--device", "cpu", "--dtype", "float64", "--points", "0"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in out) <= 72
    assert max(len(line) for line in out) > 62  # laid out for 72, not merely short
