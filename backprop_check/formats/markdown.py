"""The Markdown report, for a CI job summary (`$GITHUB_STEP_SUMMARY`) or a pull-request comment.

The counts come first, then one table row per result that needs a look (mismatch, error,
nondifferentiable) with its culprit, worst element, the three values and the message; skipped
results are grouped by reason and the ok results fold into a `<details>` block.
"""
from __future__ import annotations

from collections import defaultdict

from backprop_check.model.arrays import NUMPY_NOTE
from backprop_check.records import VERDICTS, Check, CheckKind, Report, Result, Verdict
from backprop_check.formats.notices import notices

ICONS = {Verdict.OK: "✅", Verdict.MISMATCH: "❌", Verdict.NONDIFFERENTIABLE: "〰️", Verdict.ERROR: "💥", Verdict.SKIPPED: "⏭️"}
LOOK_AT = (Verdict.MISMATCH, Verdict.ERROR, Verdict.NONDIFFERENTIABLE)


def render(report: Report) -> str:
    return "\n".join(lines(report)) + "\n"


def lines(report: Report) -> list[str]:
    summary = report.summary
    if report.partial:
        out = [f"### ⏹️ backprop-check interrupted: partial report ({summary['total']} results)", ""]
    else:
        status = "passed" if report.exit_code == 0 else "failed"
        out = [f"### {ICONS[Verdict.OK] if report.exit_code == 0 else ICONS[Verdict.MISMATCH]} backprop-check {status}", ""]
    notes = notices(report)
    out += [f"**{_cell(line)}**" for line in notes] + ([""] if notes else [])
    out.append("| " + " | ".join(VERDICTS) + " | total | exit |")
    out.append("|" + "---:|" * (len(VERDICTS) + 2))
    out.append("| " + " | ".join(str(summary[v]) for v in VERDICTS) + f" | {summary['total']} | {report.exit_code} |")
    flagged = [r for r in report.results if r.verdict in LOOK_AT]
    flagged.sort(key=lambda r: LOOK_AT.index(r.verdict))
    if flagged:
        out += ["", "| case | run | verdict | culprit | worst element | manual | numerical | autograd | message |"]
        out.append("|---|---|---|---|---|---:|---:|---:|---|")
        out += [_row(result) for result in flagged]
    out += _skipped(report.results)
    numpy_cases = sorted({r.case for r in report.results if r.numpy})
    if numpy_cases:
        out += ["", f"ℹ️ {', '.join(f'`{name}`' for name in numpy_cases)}: {NUMPY_NOTE}"]
    out += _collapsed([r for r in report.results if r.verdict == Verdict.OK])
    out += ["", f"<sub>{report.seconds:.2f}s</sub>"]
    return out


def _row(result: Result) -> str:
    check = worst(result)
    run = f"{result.device} {result.dtype}" if result.device != "-" else "-"
    cells = [
        f"`{result.case}`",
        run,
        f"{ICONS[result.verdict]} {result.verdict}",
        result.culprit or "",
        f"`{check.label}`" if check else "",
        _num(check.manual) if check else "",
        _num(check.numerical) if check else "",
        _num(check.autograd) if check else "",
        _cell(result.message),
    ]
    return "| " + " | ".join(cells) + " |"


def worst(result: Result) -> Check | None:
    """The element the message is about: the first failing parameter (nodes after), or None."""
    failing = [c for c in result.checks if c.verdict == result.verdict]
    params = [c for c in failing if c.kind != CheckKind.NODE]
    return (params or failing or [None])[0]


def _skipped(results: list[Result]) -> list[str]:
    reasons: dict[str, list[str]] = defaultdict(list)
    for result in results:
        if result.verdict == Verdict.SKIPPED:
            reasons[result.message].append(result.id)
    if not reasons:
        return []
    return [""] + [f"{ICONS[Verdict.SKIPPED]} {len(ids)} skipped: {_cell(reason)}" for reason, ids in reasons.items()]


def _collapsed(results: list[Result]) -> list[str]:
    if not results:
        return []
    out = ["", f"<details><summary>{len(results)} ok</summary>", "", "| case | run | closest call |", "|---|---|---|"]
    out += [f"| `{r.case}` | {r.device} {r.dtype} | {_cell(r.message)} |" for r in results]
    return out + ["", "</details>"]


def _cell(value: str) -> str:
    """Text safe inside a table cell: no pipes, no line breaks, no HTML."""
    escaped = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return " ".join(escaped.split())


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
