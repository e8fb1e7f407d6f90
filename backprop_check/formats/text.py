"""The text report: a table of the worst element per result, then what went wrong, in words.

Fits in 100 columns: one row per result that agrees (its closest call), one row per wrong
parameter or node for a mismatch, and below the table a paragraph per failing result.
"""
from __future__ import annotations

import textwrap
from collections import defaultdict

from ..report import Report, Result

WIDTH = 100
COLUMNS = (("case", 13), ("run", 7), ("param", 13), ("manual", 9), ("numerical", 9), ("autograd", 9),
           ("abs err", 8), ("rel err", 7), ("verdict", 8), ("culprit", 8))
MAX_ROWS = 6
SHORT_VERDICT = {"nondifferentiable": "nondiff"}
SHORT_DTYPE = {"float64": "f64", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def render(report: Report) -> str:
    return "\n".join(lines(report)) + "\n"


def lines(report: Report) -> list[str]:
    shown = [r for r in report.results if r.verdict != "skipped"]
    out = [_row([name for name, _ in COLUMNS]), "-" * len(_row([name for name, _ in COLUMNS]))]
    for result in shown:
        out.extend(_rows(result))
    details = [r for r in shown if r.verdict != "ok"]
    if details:
        out.append("")
    for result in details:
        out.extend(_details(result))
    out.extend(_skipped(report.results))
    out.append("")
    summary = report.summary
    counted = ", ".join(f"{summary[v]} {v}" for v in ("ok", "mismatch", "nondifferentiable", "error", "skipped") if summary[v])
    partial = ", interrupted: partial report" if report.partial else ""
    out.append(f"{counted or 'no results'} in {report.seconds:.2f}s (exit {report.exit_code}{partial})")
    return out


def _rows(result: Result) -> list[list[str] | str]:
    run = f"{result.device} {SHORT_DTYPE.get(result.dtype, result.dtype)}" if result.device != "-" else "-"
    if result.verdict == "error" or not result.checks:
        return [_row([result.case, run, "-", "", "", "", "", "", SHORT_VERDICT.get(result.verdict, result.verdict), ""])]
    if result.verdict == "ok":
        checks = [max(result.checks, key=lambda c: c.ratio)]
    else:
        wanted = "mismatch" if result.verdict == "mismatch" else "nondifferentiable"
        checks = [c for c in result.checks if c.verdict == wanted][:MAX_ROWS]
    rows = []
    for i, check in enumerate(checks):
        rows.append(_row([
            result.case if i == 0 else "",
            run if i == 0 else "",
            check.label.replace(", ", ","),
            _num(check.manual, 9),
            _num(check.numerical, 9),
            _num(check.autograd, 9),
            _num(check.abs_err, 8),
            _num(check.rel_err, 7),
            SHORT_VERDICT.get(result.verdict, result.verdict) if i == 0 else "",
            (check.culprit or "") if check.verdict == "mismatch" else "",
        ]))
    return rows


def _details(result: Result) -> list[str]:
    mark = {"mismatch": "✗", "error": "!", "nondifferentiable": "~"}.get(result.verdict, "·")
    head = f"{mark} {result.id}: " if result.device != "-" else f"{mark} "
    out = textwrap.wrap(head + result.message, WIDTH, subsequent_indent="    ")
    for hint in result.hints:
        out.extend(textwrap.wrap(f"hint: {hint}", WIDTH, initial_indent="    ", subsequent_indent="      "))
    for note in result.notes:
        out.extend(textwrap.wrap(f"note: {note}", WIDTH, initial_indent="    ", subsequent_indent="      "))
    return out


def _skipped(results: list[Result]) -> list[str]:
    reasons: dict[str, list[str]] = defaultdict(list)
    for result in results:
        if result.verdict == "skipped":
            reasons[result.message].append(result.id)
    return [f"skipped {len(ids)}: {reason}" for reason, ids in reasons.items()]


def _row(cells: list[str]) -> str:
    parts = []
    for (name, width), cell in zip(COLUMNS, cells):
        text = str(cell)
        if len(text) > width:
            text = text[: width - 1] + "…"
        parts.append(text.ljust(width))
    return " ".join(parts).rstrip()


def _num(value: float | None, width: int) -> str:
    """The most significant digits of `value` that fit in `width` characters."""
    if value is None:
        return ""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    for digits in range(6, 0, -1):
        text = f"{value:.{digits}g}".replace("e-0", "e-").replace("e+0", "e+")
        if len(text) <= width:
            return text
    return text
