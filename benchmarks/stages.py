"""Where the time of one default `check()` goes (issue 22): per stage of the runner, with the
number of calls of the user's function, on the Functions of kernels.py.

Each stage is timed by wrapping the runner's entry to it (inclusive times: a stage that calls
the user's forward counts that forward too); `forward calls` counts every call of the user's
`fn`. The first check in a process is timed apart from the next ones: it pays torch's lazy
imports (`torch._dynamo` through torch.func, `torch.distributed.tensor` on the first dispatch to
a tensor subclass, sympy through autograd.grad with grad_outputs).

    .venv/bin/python benchmarks/stages.py [--repeats N]
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

import backprop_check
from backprop_check.engine import runner
from backprop_check.engine import guards, rounding
from backprop_check.sources import SOURCES
import kernels
from measure import table

STAGES = (
    "float64 references, given point",
    "float64 references, random points",
    "float32 twin: its references",
    "float32 twin: rounding allowances",
    "guards at the given point (checked_given)",
    "random points drawn",
    "autograd source",
    "manual source",
    "contract items (extra_checks)",
    "referee: refine / locate",
    "compare",
    "result and report building (summarize)",
)


class Clock:
    """Inclusive seconds per stage, and calls of the user's function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.forwards = 0

    def wrap(self, owner: Any, attribute: str, stage: Callable[..., str] | str) -> Callable[[], None]:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            name = stage(*args, **kwargs) if callable(stage) else stage
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started

        setattr(owner, attribute, timed)
        return lambda: setattr(owner, attribute, original)


def reference_stage(case: Any, point: Any, dtype: torch.dtype, plan: Any) -> str:
    if dtype != torch.float64:
        return "float32 twin: its references"
    return "float64 references, given point" if point.seed is None else "float64 references, random points"


@contextmanager
def clocked(clock: Clock) -> Iterator[None]:
    undo = [
        clock.wrap(runner, "numerical_for", reference_stage),
        clock.wrap(rounding, "allowances", "float32 twin: rounding allowances"),
        clock.wrap(runner, "checked_given", "guards at the given point (checked_given)"),
        clock.wrap(guards, "random_point", "random points drawn"),
        clock.wrap(runner, "refereed", "referee: refine / locate"),
        clock.wrap(runner, "compare", "compare"),
        clock.wrap(runner, "summarize", "result and report building (summarize)"),
        clock.wrap(runner, "extra_checks", "contract items (extra_checks)"),
    ]
    sources = dict(SOURCES)
    for name, stage in (("autograd", "autograd source"), ("manual", "manual source")):
        original = sources[name]

        def timed(*args: Any, _original: Callable[..., Any] = original, _stage: str = stage, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                clock.seconds[_stage] += time.perf_counter() - started

        SOURCES[name] = timed
    try:
        yield
    finally:
        SOURCES.update(sources)
        for step in undo:
            step()


def counted(fn: Callable[..., torch.Tensor], clock: Clock) -> Callable[..., torch.Tensor]:
    def forward(*args: torch.Tensor) -> torch.Tensor:
        clock.forwards += 1
        return fn(*args)

    forward.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]  # check() names inputs by it
    return forward


def profile(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> tuple[float, Clock]:
    clock = Clock()
    with clocked(clock):
        started = time.perf_counter()
        backprop_check.check(counted(fn, clock), inputs)
        total = time.perf_counter() - started
    return total, clock


def run(repeats: int = 3) -> str:
    lines = [f"torch threads outside the checks {torch.get_num_threads()} (the policy runs these on 1)"]
    for name, (fn, inputs) in kernels.functions().items():
        first, _ = profile(fn, inputs) if name == "attention" else (None, None)  # first check of the process
        runs = [profile(fn, inputs) for _ in range(repeats)]
        total = sorted(t for t, _ in runs)[len(runs) // 2]
        clock = runs[[t for t, _ in runs].index(total)][1]
        rows = [[stage, f"{clock.seconds.get(stage, 0.0) * 1000:.1f} ms", f"{clock.seconds.get(stage, 0.0) / total:.0%}"] for stage in STAGES]
        header = f"{name}: default check() {total * 1000:.0f} ms (median of {repeats}), {clock.forwards} forward calls"
        if first is not None:
            header += f"; the first check of this process {first:.2f} s"
        lines += ["", header, table(["stage (inclusive)", "time", "share"], rows)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(run(args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
