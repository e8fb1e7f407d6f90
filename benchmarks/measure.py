"""Timing on a shared, noisy machine, and the plain-text tables the benchmarks print.

Contenders are timed in interleaved rounds (A, B, C, A, B, C, …) so that a burst of load from a
neighbour falls on all of them alike; what is reported is the median of each and the ratio of
medians.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timing:
    """The wall-clock seconds of each repeat of one contender, and what its last call returned."""

    name: str
    seconds: list[float] = field(default_factory=list)
    last: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> str:
        return f"{min(self.seconds):.3g}–{max(self.seconds):.3g}"


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: dict[str, int] | int) -> dict[str, Timing]:
    """Time each contender `repeats` times (a number, or one per name), in interleaved rounds."""
    wanted = {name: repeats if isinstance(repeats, int) else repeats[name] for name in contenders}
    timings = {name: Timing(name) for name in contenders}
    for round_ in range(max(wanted.values())):
        for name, fn in contenders.items():
            if round_ < wanted[name]:
                started = time.perf_counter()
                timings[name].last = fn()
                timings[name].seconds.append(time.perf_counter() - started)
    return timings


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the rest right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(row) for row in cells[1:]])


def seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"
