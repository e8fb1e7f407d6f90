"""The JUnit XML report, as CI systems display it: one `<testcase>` per result.

`classname` is the case file's stem and `name` the result's id (`linear[cpu-float64]`), so a CI
test view groups results by file; a file that could not be loaded is `import`, as in pytest. A mismatch is a `<failure type="mismatch">` carrying the text
report's table, message, hints and notes; a broken case an `<error>`; an unavailable device a
`<skipped>`. ElementTree does the escaping.

What is not one result goes into the suite's `<properties>` and `<system-out>`: an interrupted
run (`partial`), why nothing (or not every device asked for) was checked, and a baseline's
missing and stale entries.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from backprop_check.records import Report, Result, Verdict
from backprop_check.formats import text
from backprop_check.formats.notices import notices

SUITE = "backprop-check"
# XML 1.0 cannot carry these characters, even escaped; a case's message might contain them.
_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def render(report: Report) -> str:
    summary = report.summary
    counts = {
        "tests": str(summary["total"]),
        "failures": str(summary["mismatch"]),
        "errors": str(summary["error"]),
        "skipped": str(summary["skipped"]),
        "time": f"{report.seconds:.3f}",
    }
    root = ET.Element("testsuites", {"name": SUITE, **counts})
    suite = ET.SubElement(root, "testsuite", {"name": SUITE, **counts})
    properties = ET.SubElement(suite, "properties")
    for name, value in _properties(report).items():
        ET.SubElement(properties, "property", {"name": name, "value": _clean(value)})
    for result in report.results:
        suite.append(testcase(result))
    lines = notices(report)
    if lines:
        ET.SubElement(suite, "system-out").text = _clean("\n".join(lines))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _properties(report: Report) -> dict[str, str]:
    properties = {"exit_code": str(report.exit_code), "partial": str(report.partial).lower()}
    if report.not_checked:
        properties["not_checked"] = report.not_checked
    if report.baseline:
        properties["baseline"] = report.baseline["file"]
        properties["baseline.missing"] = " ".join(report.baseline["missing"])
        properties["baseline.stale"] = " ".join(report.baseline["stale"])
    return properties


def testcase(result: Result) -> ET.Element:
    """One result as a `<testcase>`, with its failure, error or skip reason."""
    attributes = {"classname": _classname(result), "name": _name(result), "time": f"{result.seconds:.3f}"}
    if result.file:
        attributes["file"] = result.file
    if result.line:
        attributes["line"] = str(result.line)
    element = ET.Element("testcase", attributes)
    message = _clean(result.message)
    if result.verdict == Verdict.MISMATCH:
        failure = ET.SubElement(element, "failure", {"message": message, "type": "mismatch"})
        failure.text = _clean(_explain(result))
    elif result.verdict == Verdict.ERROR:
        error = ET.SubElement(element, "error", {"message": message, "type": "error"})
        error.text = _clean(_explain(result) + (f"\n{result.traceback}" if result.traceback else ""))
    elif result.verdict == Verdict.SKIPPED:
        ET.SubElement(element, "skipped", {"message": message})
    elif message:  # ok or nondifferentiable: the closest call or the kink, for the curious
        ET.SubElement(element, "system-out").text = message
    return element


def _explain(result: Result) -> str:
    return text.render(Report(results=[result], seconds=result.seconds))


def _name(result: Result) -> str:
    """`linear[cpu-float64]`; a file that could not be loaded has no device or dtype: `import`
    (as the pytest plugin names it), or the case it names (a duplicate name)."""
    if result.device != "-":
        return result.id
    return "import" if not result.file or result.case == Path(result.file).stem else result.case


def _classname(result: Result) -> str:
    return Path(result.file).stem if result.file else SUITE


def _clean(value: str) -> str:
    return _ILLEGAL.sub("\ufffd", value)
