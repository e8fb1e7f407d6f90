"""Results and the report: what the CLI prints, the JSON file holds and the exit code says."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .compare import Check

VERDICTS = ("ok", "mismatch", "nondifferentiable", "error", "skipped")


@dataclass
class Result:
    """One checked combination: a case on a device in a dtype, over all its points."""

    case: str
    device: str
    dtype: str
    verdict: str
    culprit: str | None = None
    message: str = ""
    file: str | None = None
    line: int | None = None
    first_bad_node: str | None = None
    point: str | None = None
    seed: int | None = None
    checks: list[Check] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    points: int = 0
    seconds: float = 0.0
    traceback: str | None = None
    # The loss and autograd gradients at the given point: what a baseline stores.
    reference: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        """`linear[cpu-float64]`, as pytest and JUnit show it."""
        return f"{self.case}[{self.device}-{self.dtype}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "file": self.file,
            "line": self.line,
            "device": self.device,
            "dtype": self.dtype,
            "verdict": self.verdict,
            "culprit": self.culprit,
            "message": self.message,
            "first_bad_node": self.first_bad_node,
            "point": self.point,
            "seed": self.seed,
            "points": self.points,
            "hints": list(self.hints),
            "notes": list(self.notes),
            "checks": [check.to_dict() for check in self.checks],
            "seconds": round(self.seconds, 6),
            "reference": self.reference,
        }


@dataclass
class Report:
    """Every result of a run. `exit_code`: 0 all ok, 1 a mismatch, 2 an error (2 wins)."""

    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def summary(self) -> dict[str, int]:
        counts = Counter(result.verdict for result in self.results)
        return {verdict: counts.get(verdict, 0) for verdict in VERDICTS} | {"total": len(self.results)}

    @property
    def exit_code(self) -> int:
        code = 0
        for result in self.results:
            if result.verdict == "error":
                code |= 2
            elif result.verdict == "mismatch":
                code |= 1
        return 2 if code & 2 else code

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def _repr_html_(self) -> str:
        """The report as an HTML table with coloured verdicts: what a notebook shows."""
        from .formats import html

        return html.render(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [result.to_dict() for result in self.results],
            "summary": self.summary | {"exit_code": self.exit_code, "seconds": round(self.seconds, 3)},
        }
