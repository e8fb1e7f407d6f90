"""Every record a run makes, in one place: the verdicts, culprits and kinds of check (enums),
one tensor's `Check`, the `Outcome` at one point, the `Result` of one case × device × dtype and
the `Report` of a run (what the CLI prints, the JSON file holds and the exit code says).

The enums are `str` enums: a record compares equal to, and serializes as, its plain value
("ok", "manual", "param"), which is what the JSON report and the contract say.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backprop_check.diagnosis.graph import Graph
    from backprop_check.diagnosis.shapes import ShapeSlip
    from backprop_check.model.points import Point
    from backprop_check.options import Plan
    from backprop_check.sources import Gradients


class _Word(str, Enum):
    """A str enum that prints as its value."""

    def __str__(self) -> str:
        return self.value


class Verdict(_Word):
    """Per checked combination (contract): ok, mismatch, nondifferentiable, error, skipped."""

    OK = "ok"
    MISMATCH = "mismatch"
    NONDIFFERENTIABLE = "nondifferentiable"
    ERROR = "error"
    SKIPPED = "skipped"


class Culprit(_Word):
    """The one source that disagrees with the other two (contract: manual, autograd,
    numerical, reference: a kernel's reference implementation, engine/reference.py);
    `unknown` and `undecided` are per-element findings that name no one."""

    MANUAL = "manual"
    AUTOGRAD = "autograd"
    NUMERICAL = "numerical"
    REFERENCE = "reference"
    UNKNOWN = "unknown"
    UNDECIDED = "undecided"


PARTS = ("real", "imag")  # a complex tensor's element is differentiated as its two real parts


def unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index of element `flat` of a tensor of `shape` (torch.unravel_index imports sympy on
    its first call, half a second of start-up)."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def complex_label(name: str, index: tuple[int, ...]) -> str:
    """`z[3].imag`: an element of a complex tensor, from the index of its real view."""
    *at, part = index
    where = f"[{', '.join(map(str, at))}]" if at else ""
    return f"{name}{where}.{PARTS[part]}"


class CheckKind(_Word):
    """What a Check compares: a parameter's or a node's gradient, a published value
    (`expect=`), autograd across devices, a stored baseline value, one output of a function
    check, a custom-Function contract item, a forward-mode derivative (jvp.py)."""

    PARAM = "param"
    NODE = "node"
    EXPECT = "expect"
    DEVICE = "device"
    BASELINE = "baseline"
    OUTPUT = "output"
    CONTRACT = "contract"
    JVP = "jvp"


OK, MISMATCH, NONDIFFERENTIABLE = Verdict.OK, Verdict.MISMATCH, Verdict.NONDIFFERENTIABLE
VERDICTS = tuple(v.value for v in Verdict)


@dataclass
class Check:
    """One parameter or node at one point: its worst element and how it compared."""

    name: str
    kind: CheckKind
    shape: tuple[int, ...]
    verdict: Verdict
    culprit: Culprit | None = None
    index: tuple[int, ...] | None = None
    manual: float | None = None
    numerical: float | None = None
    autograd: float | None = None
    error_bar: float | None = None
    abs_err: float = 0.0
    rel_err: float = 0.0
    allowed: float = 0.0
    ratio: float = 0.0  # worst |difference| / allowed: below 1 is inside the tolerance
    rounding: float = 0.0  # the part of `allowed` that is the run dtype's rounding at this point
    bad: int = 0
    kinks: int = 0
    size: int = 1
    note: str | None = None
    culprits: dict[Culprit, int] = field(default_factory=dict)  # bad elements per culprit
    # How the tensor was checked (its elements; manual against autograd; numerical estimates;
    # random directions), and which comparison the shown error and tolerance come from.
    coverage: dict[str, int] = field(default_factory=dict)
    compared: str | None = None
    # A reference other than the three sources: autograd on the CPU for a device check, the
    # stored value for a baseline check (the `numerical` field stays the numerical gradient's).
    reference: float | None = None
    # Below float64, where the comparison shown is of a source's float64 twin (`compared` ends with
    # "(float64 twins)"): the twin's value at the element, which `abs_err` is the error of.
    twin: float | None = None
    # A complex tensor, checked as its real view: `shape` and `index` are the view's, whose last
    # index is the part (0 real, 1 imaginary); it is shown as `z[3].imag` (model/complexes.py).
    complex: bool = False
    # A wrong-shaped manual gradient: the slip behind its shape (`note` states it; hints say
    # what the derivation must do instead). Not in the JSON: the note is.
    slip: ShapeSlip | None = None

    def __post_init__(self) -> None:
        # A plain string ("param", "ok", "manual") becomes the member it names; any other fails here.
        if not isinstance(self.kind, CheckKind):
            self.kind = CheckKind(self.kind)
        if not isinstance(self.verdict, Verdict):
            self.verdict = Verdict(self.verdict)
        if self.culprit is not None and not isinstance(self.culprit, Culprit):
            self.culprit = Culprit(self.culprit)

    @property
    def label(self) -> str:
        """`W1[2, 3]`: the name and the worst element's index (`z[3].imag` for a complex z)."""
        if self.index is None or len(self.index) == 0:
            return self.name
        if self.complex:
            return complex_label(self.name, self.index)
        return f"{self.name}[{', '.join(map(str, self.index))}]"

    def _shown(self) -> tuple[list[int], list[int] | None, str | None]:
        """(shape, index, part) as the user sees the tensor: a complex one in complex terms."""
        index = None if self.index is None else list(self.index)
        if not self.complex:
            return list(self.shape), index, None
        part = None if not index else ("real", "imag")[index.pop()]
        return list(self.shape[:-1]), index, part

    def to_dict(self) -> dict[str, object]:
        shape, index, part = self._shown()
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": shape,
            "index": index,
            "complex": self.complex,
            "part": part,
            "verdict": self.verdict,
            "culprit": self.culprit,
            "manual": self.manual,
            "numerical": self.numerical,
            "numerical_error": self.error_bar,
            "autograd": self.autograd,
            "abs_err": self.abs_err,
            "rel_err": self.rel_err,
            "tolerance": self.allowed,
            "tolerance_ratio": self.ratio,
            "rounding_allowance": self.rounding,
            "bad_elements": self.bad,
            "kink_elements": self.kinks,
            "elements": self.size,
            "note": self.note,
            "compared": self.compared,
            "twin": self.twin,
            "coverage": dict(self.coverage),
            "reference": self.reference,
        }


@dataclass
class Outcome:
    point: Point
    checks: list[Check]
    verdict: Verdict
    culprit: Culprit | None
    notes: list[str] = field(default_factory=list)
    # For a mismatch: the three sources' whole tensors (hints look for patterns in them) and
    # the graph between the named nodes (where in the chain rule the derivation slipped).
    gradients: dict[str, Gradients | None] = field(default_factory=dict)
    graph: Graph | None = None


@dataclass
class Result:
    """One checked combination: a case on a device in a dtype, over all its points."""

    case: str
    device: str
    dtype: str
    verdict: Verdict
    culprit: Culprit | None = None
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
    # Which derivative was checked (1: the gradient; 2: the derivative of the gradient, …)
    # and in which mode of AD ("rev": backward; "fwd": jvp).
    order: int = 1
    mode: str = "rev"
    # The case is numpy code: no autograd, manual against the numerical gradient alone (the
    # reports say so once, below their tables: model/arrays.py's NUMPY_NOTE).
    numpy: bool = False

    def __post_init__(self) -> None:
        self.verdict = Verdict(self.verdict)
        self.culprit = None if self.culprit is None else Culprit(self.culprit)

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
            "order": self.order,
            "mode": self.mode,
            "numpy": self.numpy,
        }


# How a notebook shows a Report, by MIME type: filled by `formats` (the HTML report's fragment),
# which sits above the records and renders them; the package imports it with the API.
VIEWS: dict[str, Any] = {}

EXIT_OK = 0
EXIT_MISMATCH = 1  # a gradient mismatch, or a drift from the baseline
EXIT_ERROR = 2  # a usage error or a broken case (wins over 1)
EXIT_NOT_CHECKED = 5  # nothing was checked, or a device asked for by name is not available (as pytest's 5)
EXIT_INTERRUPTED = 130  # Ctrl-C: the report holds what was computed so far (as shells expect)


@dataclass
class Report:
    """Every result of a run. `exit_code`: 0 all ok, 1 a mismatch, 2 an error (2 wins), 5 when
    nothing was checked or a device asked for by name is missing (`not_checked` says why; an
    error or a mismatch wins), 130 when the run was interrupted (`partial`)."""

    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    partial: bool = False  # interrupted (Ctrl-C): the results computed so far
    strict_devices: bool = False  # the devices were asked for by name: a skip fails the run
    allow_empty: bool = False  # a run that checks nothing exits 0 (the old behaviour)
    # Every case file the run read → the names of the cases it defines, selected or not.
    files: dict[str, list[str]] = field(default_factory=dict)
    # What a --baseline found: its file, the results missing from it, its stale entries...
    baseline: dict[str, Any] | None = None
    # What the HTML report's summary states: the run's options and when it started (epoch s).
    plan: Plan | None = field(default=None, compare=False)
    started: float = field(default_factory=time.time, compare=False)

    @property
    def summary(self) -> dict[str, int]:
        counts = Counter(result.verdict for result in self.results)
        return {verdict: counts.get(verdict, 0) for verdict in VERDICTS} | {"total": len(self.results)}

    @property
    def not_checked(self) -> str | None:
        """Why this run fails for what it did not check (exit 5), or None."""
        skipped = [result for result in self.results if result.verdict == Verdict.SKIPPED]
        if self.strict_devices and skipped:
            devices = sorted({result.device for result in skipped})
            why = "; ".join(dict.fromkeys(result.message for result in skipped))
            return f"--device {','.join(devices)} was asked for, but {why}: {len(skipped)} of {len(self.results)} results not checked"
        if self.allow_empty or len(skipped) < len(self.results):
            return None
        if skipped:
            why = "; ".join(dict.fromkeys(result.message for result in skipped))
            return f"nothing was checked: all {len(skipped)} results were skipped ({why})"
        defined = sum(len(names) for names in self.files.values())
        if defined:
            return f"nothing was checked: the selection (-k) matches none of the {defined} cases"
        if self.files:
            empty = ", ".join(list(self.files)[:3]) + (" and more" if len(self.files) > 3 else "")
            return f"nothing was checked: no case is defined in {empty} (is @case missing?)"
        return "nothing was checked: no case file was found"

    @property
    def exit_code(self) -> int:
        if self.partial:
            return EXIT_INTERRUPTED
        code = 0
        for result in self.results:
            if result.verdict == Verdict.ERROR:
                code |= EXIT_ERROR
            elif result.verdict == Verdict.MISMATCH:
                code |= EXIT_MISMATCH
        if code:
            return EXIT_ERROR if code & EXIT_ERROR else code
        return EXIT_NOT_CHECKED if self.not_checked else EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def _repr_html_(self) -> str | None:
        """What a notebook shows: the HTML report (summary, what needs a look, ok, skipped), its
        styles scoped to it; None (the notebook shows the repr) before the formats are loaded."""
        view = VIEWS.get("text/html")
        return None if view is None else view(self)

    def to_dict(self) -> dict[str, Any]:
        summary = {"exit_code": self.exit_code, "seconds": round(self.seconds, 3), "partial": self.partial, "not_checked": self.not_checked}
        content: dict[str, Any] = {"results": [result.to_dict() for result in self.results], "summary": self.summary | summary}
        if self.baseline is not None:
            content["baseline"] = self.baseline
        return content


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: still a KeyboardInterrupt, carrying the `report` of the results
    computed so far (marked partial), so that the CLI writes it before it exits 130."""

    def __init__(self, report: Report) -> None:
        super().__init__()
        self.report = report
