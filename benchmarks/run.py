"""`make bench`: backprop_check against `torch.autograd.gradcheck`, and its start-up time.

    .venv/bin/python benchmarks/run.py [--quick] [speed] [startup] [corpus] [soundness] [scale] [parallel]
        [function] [full] [orders] [distributed] [reference] [kernels] [profile] [referee] [opinfo] [tiny]
        [small]

Prints seventeen sections (all of them when none is named) and writes nothing: the numbers are
recorded by hand in benchmarks/RESULTS.md. On a shared machine, run it when it is quiet; each
section reports medians of interleaved repeats and the ratio of medians. `--quick`: fewer
repeats and trials, for a short look (record figures from the full run).

1. speed     — the harness (Python API) and gradcheck on tanh MLPs of ~1.1k and ~22k parameters.
2. startup   — `backprop-check run cases/` against a bare `python -c "import torch"`.
3. corpus    — detection and false-alarm rates on the planted-bug corpus in tests/corpus/.
4. soundness — planted single-element errors in the default mode, 10k to 1M elements (issue 11).
5. scale     — ~1M parameters: default mode vs gradcheck fast and JAX check_grads, peak memory;
               nn.Linear(1024, 1024) with one wrong element.
6. parallel  — `pytest cases/` serial against `pytest -n 2 cases/` (benchmarks/parallel.py).
7. function  — function mode against gradcheck on a two-output custom Function; planted Function bugs.
8. full      — `--full` at ~22k parameters against gradcheck slow, with and without the replay.
9. orders    — order=2 against gradgradcheck, forward mode against gradcheck(check_forward_ad=True).
10. distributed — a tensor-parallel MLP checked on 2 and 4 gloo ranks against a one-process check.
11. reference — a bfloat16 kernel with reference= against a float64 check; false alarms; a 1.25× slip.
12. kernels  — small custom Functions and a tiled attention vmap cannot batch: check() and the drop-in
               against gradcheck, quiet and with every core kept busy (benchmarks/kernels.py).
13. profile  — where a default check()'s time goes, stage by stage (benchmarks/stages.py).
14. referee  — the numerical referee on inputs far from zero: correct torch code ok, 1e-4 slips
               found, error bars against exact derivatives (benchmarks/referee.py, issue 28).
15. opinfo   — the drop-ins on op_db against torch's slow and fast gradcheck (float64, float32,
               complex128) and gradgradcheck (float64), and planted slips (a slice of it,
               resumable: benchmarks/opinfo.py runs the whole of it).
16. tiny     — the fixed cost of a tiny check: the drop-in against torch's slow and fast gradcheck
               on functions of one to fifty elements (benchmarks/tiny.py).
17. small    — correct code far below 1 (1 − cos x, exp x − 1 − x, … at 1e-1 to 1e-7): false
               alarms where torch's gradcheck passes, and planted slips (benchmarks/small.py).
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
import distributed
import full
import kernels
import function
import opinfo
import orders
import parallel
import reference
import stages
import referee
import scale
import soundness
import speed
import startup
import small
import tiny

Section = Callable[[bool], tuple[str, list[tuple[str, bool]]]]  # quick → (text, targets)
SECTIONS: dict[str, tuple[str, Section]] = {
    "speed": ("1. harness vs torch.autograd.gradcheck (in one process, float64, CPU)",
              lambda quick: speed.run(3, 2) if quick else speed.run()),
    "startup": ("2. start-up: backprop-check run cases/ vs import torch",
                lambda quick: startup.run(3 if quick else 5)),
    "corpus": ("3. planted-bug corpus: detection and false alarms", lambda quick: corpus.run()),
    "soundness": ("4. soundness: planted single-element errors in the default mode", soundness.run),
    "scale": ("5. scale: ~1M parameters, gradcheck fast, JAX check_grads, nn.Linear(1024, 1024)",
              lambda quick: scale.run(2, 60.0) if quick else scale.run()),
    "parallel": ("6. pytest serial vs pytest -n 2 (xdist) on the built-in cases", lambda quick: parallel.run()),
    "function": ("7. function mode: a two-output custom Function vs gradcheck; the planted Function bugs",
                 lambda quick: function.run()),
    "full": ("8. --full at ~22k parameters vs gradcheck slow, with and without the replay",
             lambda quick: full.run(1 if quick else 2)),
    "orders": ("9. second order vs gradgradcheck; forward mode vs gradcheck(check_forward_ad=True)",
               lambda quick: orders.run(1 if quick else 3)),
    "distributed": ("10. distributed: a tensor-parallel MLP on 2 and 4 ranks vs a one-process check",
                    lambda quick: distributed.run(1 if quick else 3)),
    "reference": ("11. kernels: a bfloat16 kernel with reference= vs a float64 check; false alarms; one element 1.25× off",
                  reference.run),
    "kernels": ("12. kernels: small custom Functions and a tiled attention, quiet and busy, vs gradcheck",
                lambda quick: kernels.run(1 if quick else 3, busy=True)),
    "profile": ("13. profile: where a default check()'s time goes", lambda quick: (stages.run(1 if quick else 3), [])),
    "referee": ("14. the numerical referee far from zero: correct code ok, slips found, honest error bars",
                referee.run),
    "opinfo": ("15. the drop-ins on PyTorch's op_db vs torch's slow and fast gradcheck and gradgradcheck; mutants",
               opinfo.section),
    "tiny": ("16. the fixed cost of a tiny check: the drop-in vs torch's slow and fast gradcheck",
             lambda quick: tiny.run(5 if quick else 15)),
    "small": ("17. correct code far below 1: false alarms where torch passes, and planted slips",
              lambda quick: small.run(1 if quick else 2)),
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
    parser.add_argument("--quick", action="store_true", help="fewer repeats and trials: a short look")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    chosen = args.sections or list(SECTIONS)
    started = time.perf_counter()
    print(f"backprop_check benchmarks, {datetime.date.today()}: {machine()}; load {_read('/proc/loadavg').strip()}")
    failed = 0
    for name in chosen:
        title, section = SECTIONS[name]
        print(f"\n{title}\n{'=' * len(title)}\n(load {_read('/proc/loadavg').strip()})", flush=True)
        began = time.perf_counter()
        text, targets = section(args.quick)
        print(text)
        print(f"({time.perf_counter() - began:.0f}s)", flush=True)
        failed += sum(not ok for _, ok in targets)
    # A missed target is a finding to record, not a failed command: the exit status stays 0.
    print(f"\n{len(chosen)} sections in {time.perf_counter() - started:.0f}s; {failed} target(s) missed; "
          f"load {_read('/proc/loadavg').strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
