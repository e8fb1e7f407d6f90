"""Benchmark 10: the numerical referee on data as it comes (issue 28).

Three parts, all float64 referee, CPU:

- **Scales.** Correct plain-torch functions (layer norm, batch norm in training, cross-entropy,
  a daily cycle of timestamps, a logsumexp) with inputs offset by 1e3 to 1.7e9 and spread
  from 1e-3 to 1.4e4, checked in float64 and float32 at the given point and at random points
  (`sample=` keeps the offset and spread): every one must be `ok`, never `nondifferentiable`.
- **Slips.** The same functions with a hand-written gradient (autograd's own, computed inside
  `.manual`) off by a relative 1e-4 at one element, float64: culprit `manual`, that element named.
- **Accuracy.** 10 smooth functions × 60 random points (6 elements each), against exact
  derivatives (closed form or autograd): the estimate's median relative error, the share of
  points whose error bar bounds the true error (must be 100 %), and the median of bar / error.

    .venv/bin/python benchmarks/run.py referee
    .venv/bin/python benchmarks/referee.py --against /work/main    # speed before/after, side by side
    .venv/bin/python benchmarks/referee.py --against /work/main 3 --warm   # the same, each check warm
"""
from __future__ import annotations

import math
import time
import warnings
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

import backprop_check
from backprop_check.model.points import given_point
from backprop_check.sources import numerical

# (offset, spread): pixels, un-normalised features, logits with a shared offset, timestamps.
SCALES = [(1e3, 1.0), (1e5, 1.0), (1e3, 1e-3), (1e6, 1e-3), (1e9, 1e3), (1.7e9, 86400 / (2 * math.pi))]
SLIP = 1e-4


def _layer_norm(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (F.layer_norm(x, (x.shape[-1],), weight=w) * c).sum()


def _batch_norm(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (F.batch_norm(x, None, None, weight=w, training=True) * c).sum()


def _cross_entropy(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x * w, c.argmax(-1))


def _daily(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, period: float) -> torch.Tensor:
    angle = x / period
    return (w[0] * torch.sin(angle) + w[1] * torch.cos(angle)).mul(c).sum()


def _logsumexp(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, spread: float) -> torch.Tensor:
    return (torch.logsumexp(x / spread, dim=-1) * w).sum() + (x * c).sum() * 1e-3


FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "cross_entropy": _cross_entropy,
    "daily_cycle": _daily,
    "logsumexp": _logsumexp,
}


def scaled_case(kind: str, offset: float, spread: float, slip: float = 0.0) -> backprop_check.Case:
    """`kind` at inputs offset + spread·N(0, 1); with `slip`, a manual gradient off by that
    relative amount at the largest element of x's gradient."""
    rows, cols = (16, 8) if kind == "batch_norm" else (4, 16)
    width = 2 if kind == "daily_cycle" else (rows if kind == "logsumexp" else cols)
    fn = FUNCTIONS[kind]
    extra = {"period": spread} if kind == "daily_cycle" else ({"spread": spread} if kind == "logsumexp" else {})

    def draw(gen: torch.Generator) -> dict[str, torch.Tensor]:
        x = offset + spread * torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        w = 1 + 0.1 * torch.randn(width, generator=gen, dtype=torch.float64)
        return {"x": x, "w": w}

    first = draw(torch.Generator().manual_seed(1))

    @backprop_check.case(
        name=f"{kind}@{offset:g}±{spread:g}",
        params=first,
        data={"c": torch.randn(rows, cols, generator=torch.Generator().manual_seed(2), dtype=torch.float64)},
        sample=draw,
    )
    def scaled(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return fn(x, w, c, **extra)

    if slip:

        @scaled.manual
        def by_hand(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.enable_grad():
                x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
                gx, gw = torch.autograd.grad(fn(x, w, c, **extra), (x, w))
            gx = gx.clone()
            gx.view(-1)[int(gx.abs().argmax())] *= 1 + slip  # where a relative slip is largest
            return {"x": gx, "w": gw}

    return scaled


def scales(points: int) -> tuple[list[list[str]], list[tuple[str, bool]]]:
    rows, targets = [], []
    for kind in FUNCTIONS:
        for offset, spread in SCALES:
            verdicts = []
            for dtype in ("float64", "float32"):
                report = backprop_check.run(scaled_case(kind, offset, spread), dtypes=[dtype], points=points)
                result = report.results[0]
                verdicts.append(result.verdict.value if hasattr(result.verdict, "value") else str(result.verdict))
                if verdicts[-1] != "ok":
                    print(f"  {kind} at {offset:g}±{spread:g} {dtype}: {result.message}")
            slipped = backprop_check.run(scaled_case(kind, offset, spread, SLIP), dtypes=["float64"], points=points)
            found = slipped.results[0]
            named = [c for c in found.checks if c.name == "x" and c.verdict == "mismatch"]
            index = named[0].index if named else None
            # The element named is the slipped one: there manual is autograd × (1 + SLIP).
            slipped = bool(named) and named[0].manual is not None and named[0].autograd and abs(
                named[0].manual / named[0].autograd - 1 - SLIP) < 1e-3 * SLIP
            caught = str(found.verdict) == "mismatch" and str(found.culprit) == "manual" and slipped
            if not caught:
                print(f"  slip in {kind} at {offset:g}±{spread:g}: {found.verdict} {found.culprit} {index}: {found.message}")
            rows.append([kind, f"{offset:g}", f"{spread:.3g}", *verdicts, "found" if caught else "MISSED"])
            targets.append((f"{kind} at {offset:g}±{spread:.3g}: ok in float64 and float32", verdicts == ["ok", "ok"]))
            targets.append((f"{kind} at {offset:g}±{spread:.3g}: a 1e-4 slip found, manual, element named", caught))
    return rows, targets


SMOOTH: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "sin·exp": (lambda t: (torch.sin(t) * torch.exp(t / 3)).sum(),
                lambda t: torch.cos(t) * torch.exp(t / 3) + torch.sin(t) * torch.exp(t / 3) / 3),
    "log1p(t²)": (lambda t: torch.log1p(t * t).sum(), lambda t: 2 * t / (1 + t * t)),
    "1e3·t³": (lambda t: (t**3).sum() * 1e3, lambda t: 3e3 * t**2),
    "exp(5t)": (lambda t: torch.exp(5 * t).sum(), lambda t: 5 * torch.exp(5 * t)),
    "∏tanh": (lambda t: torch.tanh(t).prod(), None),
    "softplus": (lambda t: F.softplus(t).sum(), lambda t: torch.sigmoid(t)),
    "atan(3t)": (lambda t: torch.atan(3 * t).sum(), lambda t: 3 / (1 + 9 * t * t)),
    "logsumexp": (lambda t: torch.logsumexp(t, 0), lambda t: torch.softmax(t, 0)),
    "‖t‖·cos": (lambda t: t.norm() * torch.cos(t).sum(), None),
    "gelu²": (lambda t: (F.gelu(t) ** 2).sum(), None),
}


def accuracy(points: int = 60, size: int = 6) -> tuple[list[list[str]], list[tuple[str, bool]], dict[str, float]]:
    rel, ratio, honest = [], [], []
    rows = []
    for name, (loss, exact) in SMOOTH.items():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)  # not hash(): salted per process
        mine_rel, mine_ratio, mine_ok = [], [], []
        for _ in range(points):
            values = torch.randn(size, generator=gen, dtype=torch.float64) * 1.5

            @backprop_check.case(params={"t": values})
            def smooth(t: torch.Tensor) -> torch.Tensor:
                return loss(t)

            grads = numerical.gradient(smooth, given_point(smooth, 0), "cpu", torch.float64)
            if exact is None:
                t = values.clone().requires_grad_(True)
                (true,) = torch.autograd.grad(loss(t), t)
            else:
                true = exact(values)
            err = (grads.values["t"] - true).abs()
            bar = grads.error["t"]
            scale = true.abs().max()
            mine_rel.extend((err / scale).tolist())
            mine_ratio.extend((bar / err.clamp(min=1e-300)).tolist())
            mine_ok.extend((err <= bar).tolist())
        rows.append([name, f"{_median(mine_rel):.2g}", f"{100 * sum(mine_ok) / len(mine_ok):.1f} %",
                     f"{_median(mine_ratio):.3g}"])
        rel += mine_rel
        ratio += mine_ratio
        honest += mine_ok
    figures = {"median_rel": _median(rel), "bounded": sum(honest) / len(honest), "median_ratio": _median(ratio)}
    targets = [
        ("accuracy: the error bar bounds the true error at every point", figures["bounded"] == 1.0),
        ("accuracy: median relative error ≤ 5e-14", figures["median_rel"] <= 5e-14),
        ("accuracy: the bar ≤ 30× the true error at the median", figures["median_ratio"] <= 30),
    ]
    return rows, targets, figures


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run(quick: bool = False) -> tuple[str, list[tuple[str, bool]]]:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale_rows, scale_targets = scales(1 if quick else 2)
        acc_rows, acc_targets, figures = accuracy(20 if quick else 60)
    text = (
        _table(["function", "offset", "spread", "float64", "float32", "1e-4 slip"], scale_rows)
        + "\n\n"
        + _table(["smooth function", "median rel. error", "bar ≥ error", "median bar/error"], acc_rows)
        + f"\n\nall: median relative error {figures['median_rel']:.2g}, bar bounds the error at "
        f"{100 * figures['bounded']:.1f} % of elements, median bar/error {figures['median_ratio']:.3g} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return text, scale_targets + acc_targets


if __name__ == "__main__" and "--against" not in __import__("sys").argv:
    out, met = run()
    print(out)
    for label, ok in met:
        print(("met   " if ok else "MISSED"), label)


# --- before/after: the speed figures of RESULTS.md, this tree against another, side by side ---

TIMED = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, "benchmarks")
import classifier, speed
from models import make_case
cases = {
    "1,089 full (three-way)": (make_case(speed.SMALL), True),
    "21,841 default": (make_case(speed.LARGE), False),
    "21,841 default, planted x1.01": (make_case(speed.LARGE, speed.PLANTED), False),
    "22,210 default": (classifier.make_case(speed.CLASSIFIER), False),
    "22,210 default, planted x1.001": (classifier.make_case(speed.CLASSIFIER, speed.CLASSIFIER_BUG), False),
    "22,210 full (replay)": (classifier.make_case(speed.CLASSIFIER), True),
}
speed.harness(cases["1,089 full (three-way)"][0], True)  # warm-up: lazy imports, vmap set-up
out = {}
for name, (case, full) in cases.items():
    began, cpu = time.perf_counter(), time.process_time()
    got = speed.harness(case, full)
    out[name] = [time.perf_counter() - began, str(got.verdict), str(got.where), time.process_time() - cpu]
print(json.dumps(out))
"""

# Warm: each model checked once untimed in the process (first-use imports, vmap set-up), then
# the median of REPEATS further checks (2 for the replay): what a suite of many checks pays.
TIMED_WARM = TIMED.split("speed.harness(cases")[0] + """
import statistics
out = {}
for name, (case, full) in cases.items():
    speed.harness(case, full)
    walls, cpus = [], []
    for _ in range(2 if "replay" in name else 9):
        began, cpu = time.perf_counter(), time.process_time()
        got = speed.harness(case, full)
        walls.append(time.perf_counter() - began)
        cpus.append(time.process_time() - cpu)
    out[name] = [statistics.median(walls), str(got.verdict), str(got.where), statistics.median(cpus)]
print(json.dumps(out))
"""


def against(other: str, rounds: int = 2, warm: bool = False) -> str:
    """The harness timings of benchmarks/speed.py in fresh processes, this tree and `other`
    (a checkout of main) alternating, `rounds` each: medians and their ratio, of the wall time
    and of the process's CPU time (one thread: what the load of a shared machine moves least).
    `warm`: each check timed after one untimed run in its process (`TIMED_WARM`)."""
    import json
    import os
    import statistics
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent.parent)
    runs: dict[str, list[dict[str, list]]] = {"before": [], "after": []}
    for _ in range(rounds):
        for label, tree in (("before", other), ("after", here)):
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-c", TIMED_WARM if warm else TIMED], cwd=tree, env=env, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for name in runs["after"][0]:
        before = statistics.median(r[name][0] for r in runs["before"])
        after = statistics.median(r[name][0] for r in runs["after"])
        cpu_before = statistics.median(r[name][-1] for r in runs["before"])
        cpu_after = statistics.median(r[name][-1] for r in runs["after"])
        verdicts = f"{runs['before'][0][name][1]} → {runs['after'][0][name][1]}"
        rows.append([name, f"{before:.2f} s", f"{after:.2f} s", f"{after / before:.2f}×",
                     f"{cpu_before:.2f} s", f"{cpu_after:.2f} s", f"{cpu_after / cpu_before:.2f}×", verdicts])
    header = ["check (speed.py's models, float64)", "before", "after", "after/before", "CPU before", "CPU after",
              "CPU after/before", "verdict"]
    return _table(header, rows)


if __name__ == "__main__" and len(__import__("sys").argv) > 2 and __import__("sys").argv[1] == "--against":
    _argv = [a for a in __import__("sys").argv[2:] if a != "--warm"]
    print(against(_argv[0], int(_argv[1]) if len(_argv) > 1 else 2, warm="--warm" in __import__("sys").argv))
