"""The text report fits the width it is given, never cuts what tells rows apart, and colours the
verdicts only for a terminal that allows colour."""
from __future__ import annotations

import io

import pytest

from backprop_check import Report, case, run
from backprop_check.commands.cli import main
from backprop_check.formats import text
from backprop_check.formats.terminal import WIDTH, Style, style_for


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def long_names() -> Report:
    """Two cases whose names share their first 13 characters, one with a wrong element deep in a matrix."""

    @case(params={"weight": lambda g: __import__("torch").randn(600, 4, generator=g)}, data={"x": 2.0})
    def grad_penalty_ok(weight, x):
        return (weight * x).pow(2).sum()

    @grad_penalty_ok.manual
    def _(weight, x):
        return {"weight": 2 * weight * x**2}

    @case(params={"weight": lambda g: __import__("torch").randn(600, 4, generator=g)}, data={"x": 2.0})
    def grad_penalty_bad(weight, x):
        return (weight * x).pow(2).sum()

    @grad_penalty_bad.manual
    def _(weight, x):
        grad = 2 * weight * x**2
        grad[517, 3] += 1.0  # one wrong element
        return {"weight": grad}

    return run([grad_penalty_ok, grad_penalty_bad], devices=["cpu"], dtypes=["float64"], points=0)


@pytest.fixture(scope="module")
def report() -> Report:
    return long_names()


@pytest.mark.parametrize("width", [pytest.param(100, id="a-file"), pytest.param(80, id="an-80-column-terminal")])
def test_every_line_fits_the_width_and_names_stay_whole(report: Report, width: int) -> None:
    lines = text.lines(report, Style(width=width))
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    table = "\n".join(lines[:4])
    assert "grad_penalty_ok " in table and "grad_penalty_bad " in table
    assert "weight[517,3]" in table and "cpu f64" in table
    assert "…" not in table


def test_too_narrow_a_terminal_still_never_cuts_a_name(report: Report) -> None:
    lines = text.lines(report, Style(width=50))
    rows = [line for line in lines if line.startswith("grad_penalty")]
    assert [row.split()[0] for row in rows] == ["grad_penalty_ok", "grad_penalty_bad"]
    assert "weight[517,3]" in rows[1] and "mismatch" in rows[1]
    messages = [line for line in lines if line not in rows and not line.startswith(("case", "-"))]
    assert all(len(line) <= 50 for line in messages)


def test_messages_are_wrapped_to_the_width_not_at_100(report: Report) -> None:
    wide = text.lines(report, Style(width=160))
    narrow = text.lines(report, Style(width=80))
    message = [line for line in wide if line.startswith("✗ grad_penalty_bad")]
    assert message and len(message[0]) > 100  # one long line where 160 columns allow it
    assert len([line for line in narrow if not line.startswith(("grad_penalty", "case", "-"))]) > len(
        [line for line in wide if not line.startswith(("grad_penalty", "case", "-"))]
    )


def test_numbers_give_up_digits_before_the_error_columns_go(report: Report) -> None:
    assert "rel err" in text.lines(report, Style(width=100))[0]
    assert "rel err" not in text.lines(report, Style(width=50))[0]
    assert "grad_penalty_bad" in "\n".join(text.lines(report, Style(width=50)))


def test_verdicts_are_coloured_only_when_the_style_says_so(report: Report) -> None:
    plain = text.render(report, Style(width=100, colour=False))
    coloured = text.render(report, Style(width=100, colour=True))
    assert "\x1b[" not in plain
    assert "\x1b[32mok\x1b[0m" in coloured and "\x1b[1;31mmismatch\x1b[0m \x1b[1;31mmanual\x1b[0m" in coloured
    assert "\x1b" not in coloured.splitlines()[0]  # the header stays plain
    # Colour takes no columns: without its codes the coloured report is the plain one.
    import re

    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == plain


def test_a_stream_that_is_not_a_terminal_gets_100_plain_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    assert style_for(io.StringIO()) == Style(width=WIDTH, colour=False)


def test_a_terminal_gets_its_width_and_colour_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "72")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert style_for(Terminal()) == Style(width=72, colour=True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert style_for(Terminal()) == Style(width=72, colour=False)


def test_the_cli_writes_no_escape_codes_into_a_pipe(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "cases.py"
    path.write_text(
        "from backprop_check import case\n\n"
        "@case(params={'w': 1.0}, data={'x': 3.0})\n"
        "def a_case_with_a_rather_long_name(w, x):\n    return (w * x) ** 2\n"
    )
    assert main(["run", str(path), "--device", "cpu", "--dtype", "float64", "--points", "0"]) == 0
    captured = capsys.readouterr()
    assert "a_case_with_a_rather_long_name" in captured.out
    assert "\x1b" not in captured.out and "\x1b" not in captured.err and "\r" not in captured.err


def test_a_name_longer_than_the_width_loses_its_middle_in_the_table_only() -> None:
    long = "weight_of_the_seventeenth_layer_of_the_encoder_stack_after_the_attention_block"

    @case(params={long: [[1.0, 2.0], [3.0, 4.0]]})
    def wide(**values):  # noqa: ANN003, ANN202
        return (values[long] ** 2).sum()

    @wide.manual
    def _(**values):  # noqa: ANN003, ANN202
        return {long: 3 * values[long]}

    lines = text.lines(run([wide], devices=["cpu"], dtypes=["float64"], points=0), Style(width=100))
    assert all(len(line) <= 100 for line in lines), [line for line in lines if len(line) > 100]
    (row,) = [line for line in lines if line.startswith("wide ")]
    assert "weight_of_the_sevent" in row and "…" in row and "[0,0]" in row and "mismatch" in row
    assert long in "".join(line.strip() for line in lines)  # the paragraph says it whole
