"""The lines of a report that belong to no single result: an interrupted run, why nothing (or
not every device asked for) was checked, a baseline's missing and stale entries. JUnit puts
them in the suite's `<system-out>`, Markdown under its headline; JSON has them as fields."""
from __future__ import annotations

from backprop_check.records import Report


def notices(report: Report) -> list[str]:
    """The report's lines that belong to no single result, as every format shows them."""
    lines = []
    if report.partial:
        lines.append(f"interrupted: a partial report of the {len(report.results)} results computed before Ctrl-C")
    if report.not_checked:
        lines.append(report.not_checked)
    found = report.baseline
    if found:
        if found["missing"]:
            lines.append(f"baseline {found['file']}: {len(found['missing'])} results not in it: {', '.join(found['missing'])}")
        if found["stale"]:
            verb = "dropped" if found["updated"] else "stale, their case is gone"
            lines.append(f"baseline {found['file']}: {len(found['stale'])} entries {verb}: {', '.join(found['stale'])}")
    return lines
