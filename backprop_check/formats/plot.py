"""Pictures, where people would rather look than read (matplotlib: `pip install backprop_check[plot]`).

- `trace_figure`: a replayed gradient descent, the loss per step above and, below, how far apart
  the three gradients are at each step (the stop, if any, marked);
- `steps_figure`: the classic picture of why a finite difference is trusted, and of when it is
  not: its error against the step h for one element, falling as h² until rounding (ε/h) takes
  over, with the step the numerical source chose and its error bar marked.

matplotlib is imported here only, when a picture is asked for: the CLI's start-up never pays it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backprop_check.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL = "pip install 'backprop_check[plot]'"
SIZE = (8.0, 6.0)  # inches, at DPI: 800 × 600 pixels
DPI = 100


def require() -> Any:
    """matplotlib's pyplot on a file-only backend, or a one-line UsageError saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no window, no display needed
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise UsageError(f"pictures need matplotlib, which is not installed: {INSTALL}") from None
    return pyplot


def save(figure: Figure, path: str | Path) -> None:
    """Write `figure` to `path` (its format from the suffix, e.g. .png, .svg, .pdf) and free it."""
    pyplot = require()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=DPI)
    except (OSError, ValueError) as exc:  # an unknown suffix is a ValueError
        raise UsageError(f"cannot write the picture to {path}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        pyplot.close(figure)


def trace_figure(trace: dict[str, Any]) -> Figure:
    """The loss per step and the gradients' agreement per step, from `Trace.to_dict()`."""
    pyplot = require()
    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=SIZE, dpi=DPI)
    steps = trace["steps"]
    numbers = [step["step"] for step in steps]
    # A line needs two points: a replay that stops at step 1 has one, shown as a marker.
    marker = "." if len(steps) < 60 else None
    top.plot(numbers, [step["loss"] for step in steps], marker=marker, label="loss")
    top.set_ylabel("loss")
    top.set_title(f"{trace['case']}: gradient descent, lr {trace['lr']:g}, {trace['dtype']} on {trace['device']}")
    pairs = [("manual", "numerical"), ("autograd", "numerical"), ("manual", "autograd")]
    for a, b in pairs:
        distances = [_relative(step["gradients"], a, b) for step in steps]
        if any(d is not None for d in distances):
            bottom.plot(numbers, [math.nan if d is None else max(d, 1e-17) for d in distances], marker=marker, label=f"{a} vs {b}")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("max |difference| / max |numerical|")
    stopped = trace.get("stopped")
    if stopped:
        for axes in (top, bottom):
            axes.axvline(stopped["step"], color="red", linestyle="--", label=f"stopped: {stopped.get('culprit') or 'disagree'}")
    bottom.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure


def _relative(gradients: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    """The largest difference between sources `a` and `b` over every parameter, relative to the
    largest numerical gradient; None when a source is absent."""
    worst, scale = 0.0, 0.0
    for values in gradients.values():
        if values.get(a) is None or values.get(b) is None:
            return None
        first, second, reference = _flat(values[a]), _flat(values[b]), _flat(values["numerical"])
        worst = max([worst, *(abs(x - y) for x, y in zip(first, second))])
        scale = max([scale, *(abs(x) for x in reference)])
    return worst / scale if scale else worst


def _flat(value: Any) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flat(item)]
    return [float(value)]


@dataclass
class StepScan:
    """Finite differences of one element at many steps, against a reference derivative."""

    case: str
    label: str  # `W[1, 2]`
    reference: float  # the derivative the errors are measured against
    against: str  # where `reference` comes from: "autograd", "manual" or "numerical"
    steps: list[float]
    central: list[float]  # |(f(θ+h) − f(θ−h))/2h − reference|
    richardson: list[float]  # |R(h) − reference|, R two rounds of Richardson over D(h), D(h/2), D(h/4)
    chosen: float  # the first step the numerical source takes for this element
    error_bar: float  # its error bar there
    others: dict[str, float]  # the sources' distance from the numerical estimate (a mismatch stands out)


def steps_figure(scan: StepScan) -> Figure:
    """The finite-difference error against the step, the chosen step and the error bar marked."""
    pyplot = require()
    figure, axes = pyplot.subplots(figsize=SIZE, dpi=DPI)
    floor = 1e-18 * max(1.0, abs(scan.reference))
    axes.loglog(scan.steps, [max(e, floor) for e in scan.central], marker=".", label="central difference D(h)")
    axes.loglog(scan.steps, [max(e, floor) for e in scan.richardson], marker=".", label="Richardson over h, h/2, h/4 (the estimate, O(h⁶))")
    axes.axvline(scan.chosen, color="black", linestyle=":", label=f"chosen step h = {scan.chosen:.3g} (the first; smaller where truncation outweighs rounding)")
    axes.axhline(max(scan.error_bar, floor), color="green", linestyle="--", label=f"error bar of the estimate at the chosen step: {scan.error_bar:.2g}")
    for source, distance in scan.others.items():
        if distance > 0:
            axes.axhline(distance, color="red" if distance > scan.error_bar else "grey", linestyle="-.",
                         label=f"|{source} − numerical| = {distance:.2g}")
    axes.set_xlabel("step h")
    axes.set_ylabel(f"|estimate − {scan.against}|")
    axes.set_title(f"{scan.case}: finite-difference error of dloss/d{scan.label} against the step")
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure
