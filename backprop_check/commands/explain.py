"""`backprop-check explain PATH [-k NAME]`: the seeds' backpropagation table for a case.

One row per named thing, from the loss back to the parameters, at the case's given point in
float64 on the CPU: its forward value, its local gradient (d consumer / d row, where both are
scalars: the number the seeds write on each edge of the graph) and dloss/d row from each of the
three sources. On the linear example it reads as seed 000 does: ŷ = 1, s = −1, loss = 1,
dloss/ds = −2, ds/dŷ = 1, dloss/dŷ = −2, dŷ/dw = 1, dloss/dw = −2.

`--plot-steps FILE.png` draws, for the parameter element the table shows first (a wrong one, else
the closest call), the finite-difference error against the step: why the chosen step is trusted.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from backprop_check.model.case import Case
from backprop_check.records import MISMATCH, NONDIFFERENTIABLE, OK, Check, CheckKind, Verdict
from backprop_check.errors import CaseError, CaseTimeout, UsageError
from backprop_check.model.forward import call_forward
from backprop_check.diagnosis.graph import Graph, graph_of
from backprop_check.model.loader import pick
from backprop_check.model.points import Point, given_point
from backprop_check.records import Result
from backprop_check.engine.runner import run
from backprop_check.formats.terminal import style_for

if TYPE_CHECKING:
    from backprop_check.formats.plot import StepScan

WIDTH = 100
HEADER = ("node", "value", "local gradient", "manual", "numerical", "autograd", "agree")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="case files or folders")
    parser.add_argument("-k", dest="select", metavar="NAME", help="select cases by name: 'linear and not mse'")
    parser.add_argument("--seed", type=int, default=0, help="seed of random initial values (default: 0)")
    parser.add_argument("--plot-steps", metavar="FILE.png", help="draw the finite-difference error against the step for the element shown first (needs matplotlib)")


def command(args: argparse.Namespace) -> int:
    """show a case's backpropagation table: each node's value, local gradient and dloss/dnode"""
    cases, code = pick(args.paths, args.select)
    if args.plot_steps:
        from backprop_check.formats import plot

        plot.require()
        if len(cases) > 1:
            names = ", ".join(case.name for case in cases)
            raise UsageError(f"--plot-steps draws one case; {len(cases)} match ({names}): choose one with -k NAME")
    width = style_for(sys.stdout).width
    for i, case in enumerate(cases):
        if i:
            print()
        lines, status = explain(case, args.seed, width)
        print("\n".join(lines))
        code = max(code, status)
        if args.plot_steps and status != 2:
            plot.save(plot.steps_figure(step_scan(case, args.seed)), args.plot_steps)
            print(f"step picture written to {args.plot_steps}")
    return code


def explain(case: Case, seed: int = 0, width: int = WIDTH) -> tuple[list[str], int]:
    """The table's lines for `case` and the exit status of its check (0 ok, 1 mismatch, 2 error)."""
    result = run(case, devices=["cpu"], dtypes=["float64"], points=0, seed=seed).results[0]
    if result.verdict == Verdict.ERROR:
        return [f"error: {result.message}"], 2
    try:
        point = given_point(case, seed)
        graph = graph_of(case, point, keep_values=True)
    except CaseTimeout:
        raise
    except CaseError as exc:
        return [f"error: {case.where}: {case.name}: {exc}"], 2
    checks = {check.name: check for check in result.checks if check.kind in (CheckKind.PARAM, CheckKind.NODE)}
    rows = [HEADER] + [row(graph, name, checks.get(name), case.manual_fn is not None) for name in graph.order]
    lines = [f"{case.name} ({case.where}) at the given point ({describe_point(point)}), float64 on cpu", ""]
    lines += table(rows)
    lines += ["", "manual, numerical, autograd: dloss/d(node) from each source; local gradient: d(next node)/d(node)"]
    if any(check.index for check in checks.values()):
        lines.append("a tensor's row shows the element where the sources differ most")
    lines += verdict_lines(result, width)
    return lines, {OK: 0, NONDIFFERENTIABLE: 0, MISMATCH: 1}.get(result.verdict, 2)


def row(graph: Graph, name: str, check: Check | None, has_manual: bool) -> tuple[str, ...]:
    value = summary(graph.values[name], None if check is None else check.index)
    local = "; ".join(
        f"d{consumer}/d{name} = {number(grad)}"
        for consumer in graph.consumers(name)
        if (grad := graph.local_gradient(consumer, name)) is not None
    )
    if check is None:  # the loss: where the backward pass starts, dloss/dloss = 1
        return (name, value, local, "", "", "", "")
    manual = "" if check.manual is None else number(check.manual)
    if has_manual and check.manual is None:
        manual = "(shape)" if check.slip is not None else "—"
    agree = {MISMATCH: f"✗ {check.culprit or '?'}", NONDIFFERENTIABLE: "~ kink"}.get(check.verdict, "ok")
    return (check.label, value, local, manual, number(check.numerical), number(check.autograd), agree)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]


def verdict_lines(result: Result, width: int = WIDTH) -> list[str]:
    if result.verdict == OK:
        return ["all three agree"]
    mark = "~" if result.verdict == NONDIFFERENTIABLE else "✗"
    lines = textwrap.wrap(f"{mark} {result.message}", width, subsequent_indent="    ", break_on_hyphens=False)
    for hint in result.hints:
        lines += textwrap.wrap(f"hint: {hint}", width, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False)
    return lines


SCAN = range(1, 46)  # h = 2^-k·max(1, |θ|): from half the value down past float64's rounding


def step_scan(case: Case, seed: int = 0) -> StepScan:
    """Central differences of one parameter element at many steps, and the numerical source's own
    estimate there (two rounds of Richardson extrapolation over h, h/2, h/4: O(h⁶)), in float64
    at the given point: the element of the first wrong parameter, else the closest call."""
    from backprop_check.formats.plot import StepScan
    from backprop_check.sources.stencil import steps_for

    result = run(case, devices=["cpu"], dtypes=["float64"], points=0, seed=seed).results[0]
    params = [c for c in result.checks if c.kind == CheckKind.PARAM and c.index is not None and c.numerical is not None]
    if not params:
        raise UsageError(f"{case.name}: no parameter element to draw ({result.message or result.verdict})")
    check = next((c for c in params if c.verdict == MISMATCH), None) or max(params, key=lambda c: c.ratio)
    point = given_point(case, seed).cast(torch.float64)
    value = point.params[check.name]

    def loss_at(offset: float) -> float:
        moved = value.clone()
        moved[check.index] += offset
        with torch.no_grad():
            loss, _ = call_forward(case, replace(point, params={**point.params, check.name: moved}))
        return float(loss)

    odd = check.culprit if check.verdict == MISMATCH else None
    sources = {"autograd": check.autograd, "manual": check.manual}
    against = next((s for s in ("autograd", "manual") if s != odd and sources[s] is not None), "numerical")
    reference = float(sources.get(against) if against != "numerical" else check.numerical)
    scale = max(1.0, abs(float(value[check.index])))
    steps, central, richardson = [], [], []
    for k in SCAN:
        h = scale * 2.0**-k
        d_h, d_half, d_quarter = ((loss_at(t) - loss_at(-t)) / (2 * t) for t in (h, h / 2, h / 4))
        once, once_half = (4 * d_half - d_h) / 3, (4 * d_quarter - d_half) / 3  # the h² terms cancel
        steps.append(h)
        central.append(abs(d_h - reference))
        richardson.append(abs((16 * once_half - once) / 15 - reference))  # and the h⁴ terms
    chosen = float(steps_for(value[check.index].reshape(1))[0])
    others = {s: abs(v - check.numerical) for s, v in sources.items() if v is not None}
    return StepScan(case.name, check.label, reference, against, steps, central, richardson, chosen,
                    float(check.error_bar or 0.0), others)


def describe_point(point: Point) -> str:
    params = ", ".join(f"{k} = {summary(v)}" for k, v in point.params.items())
    data = ", ".join(f"{k} = {summary(v)}" for k, v in point.data.items())
    return "; ".join(part for part in (params, data) if part)


def summary(tensor: torch.Tensor, index: tuple[int, ...] | None = None) -> str:
    """A scalar as its number, a tensor as its shape (and the element at `index`)."""
    if tensor.numel() == 1:
        return number(float(tensor.detach().reshape(())))
    # 4×6, but a vector as its length in words: "w = 2 tensor" reads like a value
    shape = "×".join(map(str, tensor.shape)) if tensor.dim() > 1 else f"{tensor.numel()} elements"
    if index is None or len(index) != tensor.dim():
        return f"{shape} tensor" if tensor.dim() > 1 else f"tensor of {shape}"
    return f"{number(float(tensor.detach()[index]))} (of {shape})"


def number(value: float | None) -> str:
    if value is None:
        return ""
    text = f"{value:.8g}"
    return "0" if text == "-0" else text
