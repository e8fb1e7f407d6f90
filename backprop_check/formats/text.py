"""The text report: a table of the worst element per result, then what went wrong, in words.

One row per result that agrees (its closest call), one row per wrong parameter or node for a
mismatch, and below the table a paragraph per failing result, wrapped to the width.

The table fits the width it is given (the terminal's, or 100 columns in a file): the columns that
tell rows apart — the case, the run and the located element — are cut last: the numbers give up
digits first, then the error columns go, then a name too long for the width loses its middle. On a terminal the verdicts are coloured.
"""
from __future__ import annotations

import textwrap
from collections import defaultdict

from backprop_check import dtypes
from backprop_check.model.arrays import NUMPY_NOTE
from backprop_check.records import CheckKind, Report, Result, Verdict
from backprop_check.formats.terminal import Style

HEADER = ("case", "run", "param", "manual", "numerical", "autograd", "abs err", "rel err", "verdict", "culprit")
# Columns that tell rows apart or say the verdict: always whole.
WHOLE = {"case", "run", "param", "verdict", "culprit"}
# The numbers' widths: preferred, and the least that still shows two significant digits (and the header).
NUMBERS = {"manual": (9, 7), "numerical": (9, 7), "autograd": (9, 8), "abs err": (8, 7), "rel err": (7, 7)}
SHORT_HEADER = {"numerical": "numeric"}  # when its column is narrowed below the full word
DROPPED_FIRST = ("rel err", "abs err")  # when even the narrowest numbers do not fit
MAX_ROWS = 6
CUT_TO = 24  # the least a name is cut to where it does not fit the width
SHORT_VERDICT = {Verdict.NONDIFFERENTIABLE: "nondiff"}
MARKS = {Verdict.MISMATCH: "✗", Verdict.ERROR: "!", Verdict.NONDIFFERENTIABLE: "~"}


def render(report: Report, style: Style | None = None) -> str:
    """The report as text laid out for `style` (default: 100 columns, no colour)."""
    return "\n".join(lines(report, style or Style())) + "\n"


def lines(report: Report, style: Style | None = None) -> list[str]:
    style = style or Style()
    shown = [r for r in report.results if r.verdict != Verdict.SKIPPED]
    rows = [row for result in shown for row in _rows(result)]
    out = _table(rows, style)
    details = [r for r in shown if r.verdict != Verdict.OK]
    if details:
        out.append("")
    for result in details:
        out.extend(_details(result, style))
    out.extend(_skipped(report.results))
    out.extend(_numpy(report.results, style.width))
    out.extend(_coverage(shown, style.width))
    out.append("")
    summary = report.summary
    counted = ", ".join(
        style.paint(f"{summary[v]} {v}", v) for v in Verdict if summary[v]
    )
    partial = ", interrupted: partial report" if report.partial else ""
    out.append(f"{counted or 'no results'} in {report.seconds:.2f}s (exit {report.exit_code}{partial})")
    return out


Row = dict[str, object]  # column → a string, or a float for the number columns (rendered to fit)


def _rows(result: Result) -> list[Row]:
    run = f"{result.device} {dtypes.TABLE[result.dtype].short if result.dtype in dtypes.TABLE else result.dtype}" if result.device != "-" else "-"
    verdict = SHORT_VERDICT.get(result.verdict, result.verdict)
    if result.verdict == Verdict.ERROR or not result.checks:
        return [{"case": result.case, "run": run, "param": "-", "verdict": verdict, "_verdict": result.verdict}]
    if result.verdict == Verdict.OK:
        checks = [max(result.checks, key=lambda c: c.ratio)]
    else:
        wanted = Verdict.MISMATCH if result.verdict == Verdict.MISMATCH else Verdict.NONDIFFERENTIABLE
        checks = [c for c in result.checks if c.verdict == wanted][:MAX_ROWS]
    rows: list[Row] = []
    for i, check in enumerate(checks):
        culprit = ""
        if check.verdict == Verdict.MISMATCH:
            culprit = check.culprit or ("expect" if check.kind == CheckKind.EXPECT else "")  # printed
        rows.append({
            "case": result.case if i == 0 else "",
            "run": run if i == 0 else "",
            "param": check.label.replace(", ", ","),
            "manual": check.manual,
            "numerical": check.numerical,
            "autograd": check.autograd,
            "abs err": check.abs_err,
            "rel err": check.rel_err,
            "verdict": verdict if i == 0 else "",
            "culprit": culprit,
            "_verdict": result.verdict,
        })
    return rows


def _table(rows: list[Row], style: Style) -> list[str]:
    columns = list(HEADER)
    widths = {name: max([len(name)] + [len(str(row.get(name) or "")) for row in rows]) for name in WHOLE}
    widths.update({name: preferred for name, (preferred, _) in NUMBERS.items()})

    def total() -> int:
        return sum(widths[name] for name in columns) + len(columns) - 1

    # Narrow the numbers one character at a time, widest first, down to their least widths.
    while total() > style.width:
        narrowable = [n for n in columns if n in NUMBERS and widths[n] > NUMBERS[n][1]]
        if not narrowable:
            break
        widest = max(narrowable, key=lambda n: widths[n] - NUMBERS[n][1])
        widths[widest] -= 1
    for name in DROPPED_FIRST:
        if total() <= style.width:
            break
        columns.remove(name)
    # Last, a name too long for the width (a weight called after its whole layer) is cut in the
    # middle, keeping its start and its element; the paragraph below says it whole.
    for name in ("param", "case"):
        if total() > style.width and widths[name] > CUT_TO:
            widths[name] = max(CUT_TO, widths[name] - (total() - style.width))
    labels = {name: name if len(name) <= widths[name] else SHORT_HEADER[name] for name in columns}
    header = _line(labels, columns, widths, style)
    out = [header, "-" * min(len(header), style.width)]
    out += [_line(row, columns, widths, style) for row in rows]
    return out


def _line(row: Row, columns: list[str], widths: dict[str, int], style: Style) -> str:
    parts = []
    for name in columns:
        value = row.get(name)
        cell = _num(value, widths[name]) if name in NUMBERS and not isinstance(value, str) else str(value or "")
        if len(cell) > widths[name]:  # a name cut to fit (`_table`)
            keep = widths[name] - 1
            cell = cell[: keep - keep // 2] + "…" + cell[len(cell) - keep // 2 :]
        padded = cell.ljust(widths[name])
        if name == "verdict" and "_verdict" in row:
            padded = style.paint(cell, str(row["_verdict"])) + " " * (widths[name] - len(cell))
        elif name == "culprit" and cell and "_verdict" in row:  # a result's row, not the header
            padded = style.paint(cell, Verdict.MISMATCH) + " " * (widths[name] - len(cell))
        parts.append(padded)
    return " ".join(parts).rstrip()


def _details(result: Result, style: Style) -> list[str]:
    mark = style.paint(MARKS.get(result.verdict, "·"), result.verdict)
    head = f"{mark} {result.id}: " if result.device != "-" else f"{mark} "
    # Wrapped without the colour codes (they take no columns), which are put back after.
    plain = MARKS.get(result.verdict, "·")
    out = textwrap.wrap(plain + head[len(mark):] + result.message, style.width, subsequent_indent="    ", break_on_hyphens=False)
    if out:
        out[0] = mark + out[0][len(plain):]
    for check in result.checks:
        # The custom-Function contract's findings (a backward that ignores grad_output) are
        # rows of their own with no numbers: what they found is said here, in words.
        if check.kind == CheckKind.CONTRACT and check.verdict == Verdict.MISMATCH and check.note and check.note not in result.message:
            out.extend(textwrap.wrap(f"{check.name}: {check.note}", style.width, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False))
    for hint in result.hints:
        out.extend(textwrap.wrap(f"hint: {hint}", style.width, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False))
    for note in result.notes:
        out.extend(textwrap.wrap(f"note: {note}", style.width, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False))
    return out


def _skipped(results: list[Result]) -> list[str]:
    reasons: dict[str, list[str]] = defaultdict(list)
    for result in results:
        if result.verdict == Verdict.SKIPPED:
            reasons[result.message].append(result.id)
    return [f"skipped {len(ids)}: {reason}" for reason, ids in reasons.items()]


def _coverage(results: list[Result], width: int) -> list[str]:
    """How the tensors too large to estimate element by element were checked, once per case."""
    said: dict[tuple[str, str], str] = {}
    for result in results:
        for check in result.checks:
            seen = check.coverage
            if not seen or seen.get("numerical", 0) >= seen.get("elements", 0):
                continue
            both = "manual against autograd at every element, " if seen.get("manual_vs_autograd") else ""
            said.setdefault((result.case, check.name), (
                f"{check.name} ({seen['elements']} elements): {both}numerical at {seen['numerical']} "
                f"elements and along {seen['directions']} random directions"
            ))
    by_case: dict[str, list[str]] = defaultdict(list)
    for (case, _), text in said.items():
        by_case[case].append(text)
    return [
        line
        for case, texts in by_case.items()
        for line in textwrap.wrap(f"coverage: {case}: {'; '.join(texts)}", width, subsequent_indent="    ")
    ]


def _numpy(results: list[Result], width: int) -> list[str]:
    names = sorted({result.case for result in results if result.numpy})  # said once, below the table
    return textwrap.wrap(f"note: {', '.join(names)}: {NUMPY_NOTE}", width, subsequent_indent="    ") if names else []


def _num(value: object, width: int) -> str:
    """The most significant digits of `value` that fit in `width` characters."""
    if value is None:
        return ""
    value = float(value)  # type: ignore[arg-type]
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    text = str(value)
    for digits in range(6, 0, -1):
        text = f"{value:.{digits}g}".replace("e-0", "e-").replace("e+0", "e+")
        if len(text) <= width:
            return text
    return text
