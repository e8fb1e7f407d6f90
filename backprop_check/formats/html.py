"""The HTML report: one table row per result with its verdict coloured, then what went wrong.

What a notebook shows for a `Report` (`Report._repr_html_`), and `--format html`. Every text from
a result is escaped: a case name or a message may hold `<`, `&` or quotes.
"""
from __future__ import annotations

from html import escape

from backprop_check.records import Report, Result, Verdict

COLOURS = {
    Verdict.OK: "#1a7f37",
    Verdict.MISMATCH: "#cf222e",
    Verdict.NONDIFFERENTIABLE: "#9a6700",
    Verdict.ERROR: "#8250df",
    Verdict.SKIPPED: "#6e7781",
}
HEADER = ("case", "run", "element", "manual", "numerical", "autograd", "abs err", "verdict", "culprit", "message")


def render(report: Report) -> str:
    """The report as an HTML fragment: a table, then a summary line."""
    rows = "\n".join(_row(result) for result in report.results)
    head = "".join(f"<th style=\"text-align:left\">{escape(name)}</th>" for name in HEADER)
    summary = report.summary
    counted = ", ".join(
        f"<span style=\"color:{COLOURS[v]}\">{summary[v]} {v}</span>" for v in COLOURS if summary[v]
    ) or "no results"
    return (
        "<div class=\"backprop-check\">\n"
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n"
        f"<p>{counted} in {report.seconds:.2f}s (exit {report.exit_code})</p>\n</div>\n"
    )


def _row(result: Result) -> str:
    shown = [c for c in result.checks if c.verdict == result.verdict] or result.checks
    check = max(shown, key=lambda c: c.ratio) if shown else None
    colour = COLOURS.get(result.verdict, "inherit")
    cells = [
        result.case,
        f"{result.device} {result.dtype}",
        check.label if check else "",
        _num(check.manual if check else None),
        _num(check.numerical if check else None),
        _num(check.autograd if check else None),
        _num(check.abs_err if check else None),
    ]
    tds = "".join(f"<td>{escape(cell)}</td>" for cell in cells)
    tds += f"<td style=\"color:{colour};font-weight:bold\">{escape(result.verdict)}</td>"
    tds += f"<td>{escape(result.culprit or '')}</td>"
    details = [result.message, *(f"hint: {h}" for h in result.hints), *(f"note: {n}" for n in result.notes)]
    tds += "<td style=\"text-align:left\">" + "<br>".join(escape(d) for d in details if d) + "</td>"
    return f"<tr>{tds}</tr>"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
