"""`make bench`: backprop_check against `torch.autograd.gradcheck`, and its start-up time.

    .venv/bin/python benchmarks/run.py [speed] [startup] [corpus] [parallel] [function]

Prints four sections (all of them when none is named) and writes nothing: the numbers are
recorded by hand in benchmarks/RESULTS.md. On a shared machine, run it when it is quiet; each
section reports medians of interleaved repeats and the ratio of medians.

1. speed   — the harness (Python API) and gradcheck on tanh MLPs of ~1.1k and ~22k parameters.
2. startup — `backprop-check run cases/` against a bare `python -c "import torch"`.
3. corpus  — detection and false-alarm rates on the planted-bug corpus in tests/corpus/.
4. parallel — `pytest cases/` serial against `pytest -n 2 cases/` (benchmarks/parallel.py).
5. function — function mode against gradcheck on a two-output custom Function; planted Function bugs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import torch

import corpus
import parallel
import function
import speed
import startup

SECTIONS: dict[str, tuple[str, Callable[[], tuple[str, list[tuple[str, bool]]]]]] = {
    "speed": ("1. harness vs torch.autograd.gradcheck (in one process, float64, CPU)", speed.run),
    "startup": ("2. start-up: backprop-check run cases/ vs import torch", startup.run),
    "corpus": ("3. planted-bug corpus: detection and false alarms", corpus.run),
    "parallel": ("4. pytest serial vs pytest -n 2 (xdist) on the built-in cases", parallel.run),
    "function": ("5. function mode: a two-output custom Function vs gradcheck; the planted Function bugs", function.run),
}


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return (
        f"{model}, {_cpus()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {platform.system()}"
    )


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"{', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    chosen = args.sections or list(SECTIONS)
    started = time.perf_counter()
    print(f"backprop_check benchmarks, {datetime.date.today()}: {machine()}")
    failed = 0
    for name in chosen:
        title, section = SECTIONS[name]
        print(f"\n{title}\n{'=' * len(title)}", flush=True)
        began = time.perf_counter()
        text, targets = section()
        print(text)
        print(f"({time.perf_counter() - began:.0f}s)", flush=True)
        failed += sum(not ok for _, ok in targets)
    # A missed target is a finding to record, not a failed command: the exit status stays 0.
    print(f"\n{len(chosen)} sections in {time.perf_counter() - started:.0f}s; {failed} target(s) missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
