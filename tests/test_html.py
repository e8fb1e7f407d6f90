"""The HTML report a notebook shows for a Report: a table, verdicts coloured, every text escaped."""
from __future__ import annotations

from html.parser import HTMLParser

from backprop_check import Report, Result, case, run
from backprop_check.cli import main


class Cells(HTMLParser):
    """The text of every table cell, row by row, and each cell's style."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, str]]] = []
        self._style: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._style = dict(attrs).get("style") or ""
            self.rows[-1].append(("", self._style))

    def handle_data(self, data: str) -> None:
        if self._style is not None and self.rows and self.rows[-1]:
            text, style = self.rows[-1][-1]
            self.rows[-1][-1] = (text + data, style)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._style = None


def report() -> Report:
    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
    def forgot_x(w, x, y):
        return (w * x - y) ** 2

    forgot_x.manual(lambda w, x, y: {"w": 2 * (w * x - y)})

    @case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
    def linear(w, x, y):
        return (w * x - y) ** 2

    checked = run([linear, forgot_x], devices=["cpu"], dtypes=["float64"], points=0)
    broken = Result(case="<broken & odd>", device="cpu", dtype="float64", verdict="error", message='the loss is <nan> & "odd"')
    return Report(results=[*checked.results, broken], seconds=0.25)


def test_a_notebook_shows_a_table_with_one_row_per_result_and_coloured_verdicts() -> None:
    parsed = Cells()
    parsed.feed(report()._repr_html_())
    header, *rows = parsed.rows
    assert [text for text, _ in header][:3] == ["case", "run", "element"]
    assert [[text for text, _ in row][0] for row in rows] == ["linear", "forgot_x", "<broken & odd>"]
    verdicts = {row[0][0]: row[7] for row in rows}
    assert verdicts["linear"] == ("ok", "color:#1a7f37;font-weight:bold")
    assert verdicts["forgot_x"][0] == "mismatch" and "#cf222e" in verdicts["forgot_x"][1]
    assert rows[1][8][0] == "manual" and rows[1][9][0].startswith("manual is the odd one out")
    assert rows[2][9][0] == 'the loss is <nan> & "odd"'  # escaped in the HTML, whole once parsed


def test_nothing_from_a_result_reaches_the_html_unescaped() -> None:
    html = report()._repr_html_()
    assert "<broken" not in html and "<nan>" not in html and "&lt;nan&gt; &amp; &quot;odd&quot;" in html


def test_the_cli_writes_the_html_format(capsys, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "cases.py"
    path.write_text("from backprop_check import case\n\n@case(params={'w': 1.0})\ndef square(w):\n    return w ** 2\n")
    assert main(["run", str(path), "--device", "cpu", "--format", "html"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('<div class="backprop-check">') and "<td>square</td>" in out
