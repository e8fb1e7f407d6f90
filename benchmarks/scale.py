"""Benchmark 5: large models. The default mode against `gradcheck(fast_mode=True)` and JAX's
`jax.test_util.check_grads` at ~22k and ~1M parameters, with peak memory; and issue 11's
`nn.Linear(1024, 1024)` scenario (one element of the weight gradient 1 % and 10 % off).

Times: interleaved repeats in this process, medians and ratios of medians (as `speed.py`).
Memory: each contender once more in a fresh process (`python benchmarks/scale.py --peak NAME`),
whose resident-set high-water mark (VmHWM, reset just before the check) is its peak: torch's CPU
allocator is invisible to tracemalloc, RSS is not.

gradcheck fast and check_grads each check one random projection of the gradient: they name no
element. JAX is a bench-only extra (`pip install jax`, or `pip install -e ".[bench]"`; `make bench`
tries it); without it the JAX rows say how to install it.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import backprop_check
from classifier import Classifier, make_case
from measure import interleaved, seconds, table, verdict
from speed import CLASSIFIER, Outcome, gradcheck, harness

BIG = Classifier((1000, 1000, 10), batch=64)  # 1,011,010 parameters
TARGET_BIG = 20.0  # the default mode within 20× of gradcheck fast at ~1M
LINEAR_WIDTH = 1024
LINEAR_BATCH = 8
LINEAR_INDEX = (300, 700)
LINEAR_FACTORS = (1.01, 1.1)
LINEAR_LIMIT = 120.0  # seconds per case; the harness's own default is 300
JAX_MISSING = 'jax is not installed: `.venv/bin/pip install jax` (or `pip install -e ".[bench]"`)'
MODELS = {"22k": CLASSIFIER, "1M": BIG}


def jax_check(model: Classifier) -> Callable[[], Outcome] | str:
    """check_grads (reverse mode, first order) on the model in jax.numpy, float64, or why not."""
    try:
        import jax
        import jax.numpy as jnp
        from jax.test_util import check_grads
    except ImportError:
        return JAX_MISSING
    jax.config.update("jax_enable_x64", True)
    data = model.data()
    X, labels = jnp.asarray(data["X"].numpy()), jnp.asarray(data["labels"].numpy())
    params = model.params()
    args = tuple(jnp.asarray(params[name].numpy()) for name in model.names)
    layers = model.layers

    def loss(*values: Any) -> Any:
        a = X
        for layer in range(layers):
            z = a @ values[2 * layer] + values[2 * layer + 1]
            a = jnp.tanh(z) if layer < layers - 1 else z
        return -jnp.mean(jax.nn.log_softmax(a)[jnp.arange(labels.shape[0]), labels])

    def check() -> Outcome:
        try:
            check_grads(loss, args, order=1, modes=("rev",))
        except AssertionError:
            return Outcome("mismatch")
        return Outcome("ok")

    return check


def linear_case(factor: float) -> backprop_check.Case:
    """nn.Linear(1024, 1024) under an MSE loss, its manual weight gradient off at one element."""
    gen = torch.Generator().manual_seed(3)
    data = {
        "X": torch.randn(LINEAR_BATCH, LINEAR_WIDTH, generator=gen, dtype=torch.float64),
        "Y": torch.randn(LINEAR_BATCH, LINEAR_WIDTH, generator=gen, dtype=torch.float64),
    }

    @backprop_check.case(module=lambda: torch.nn.Linear(LINEAR_WIDTH, LINEAR_WIDTH), data=data,
                         name=f"linear_{LINEAR_WIDTH}_x{factor:g}")
    def linear(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(X), Y)

    @linear.manual
    def linear_manual(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor) -> dict[str, torch.Tensor]:
        dloss_dout = 2 * (model(X) - Y) / Y.numel()
        weight = dloss_dout.T @ X  # out = X·Wᵀ + b
        weight[LINEAR_INDEX] *= factor
        return {"weight": weight, "bias": dloss_dout.sum(dim=0)}

    return linear


def linear_run(factor: float, limit: float) -> Outcome:
    """The default options but float64 only (given point + 3 random points), CPU."""
    report = backprop_check.run([linear_case(factor)], devices=["cpu"], dtypes=["float64"], timeout=limit)
    (result,) = report.results
    bad = [check.label for check in result.checks if check.verdict == "mismatch"]
    where = bad[0] if bad else None
    if result.verdict == "error":
        return Outcome("error: " + result.message.rsplit(": ", 1)[-1][:70])
    return Outcome(result.verdict, result.culprit, where)


def contender(name: str, limit: float) -> Callable[[], Outcome] | str:
    """A check by name: `harness-1M`, `gradcheck-fast-22k`, `jax-1M`, `linear-1.1`…"""
    kind, _, size = name.rpartition("-")
    if kind == "linear":
        return lambda: linear_run(float(size), limit)
    model = MODELS[size]
    if kind == "harness":
        case = make_case(model)
        return lambda: harness(case, full=False)
    if kind == "gradcheck-fast":
        return lambda: gradcheck(model, fast=True)
    if kind == "jax":
        return jax_check(model)
    raise SystemExit(f"unknown contender {name!r}")


def peak(name: str, limit: float) -> dict[str, Any]:
    """In a fresh process: the contender once; seconds, RSS high-water before and after (MiB)."""
    argv = [sys.executable, __file__, "--peak", name, "--limit", str(limit)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=Path(__file__).parent)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:100]}
    return json.loads(lines[-1])


def _child(name: str, limit: float) -> None:
    warnings.filterwarnings("ignore")
    check = contender(name, limit)
    if isinstance(check, str):
        print(json.dumps({"error": check}))
        return
    before = _reset_peak()
    started = time.perf_counter()
    outcome = check()
    elapsed = time.perf_counter() - started
    after = _peak()
    print(json.dumps({"seconds": elapsed, "before_mib": before, "peak_mib": after, "outcome": str(outcome)}))


def _status(field: str) -> float | None:
    """A `kB` field of /proc/self/status in MiB, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Reset the RSS high-water mark to the current RSS (Linux) and return that, in MiB.

    Not `getrusage(...).ru_maxrss`: Linux carries it over fork and exec, so a child of a process
    that once held 8 GiB reports 8 GiB. VmHWM belongs to the process's own address space.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    current = _status("VmRSS")
    return current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak() -> float:
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mib(value: float) -> str:
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"


def run(repeats: int = 3, limit: float = LINEAR_LIMIT) -> tuple[str, list[tuple[str, bool]]]:
    """Time and measure everything; return the printed section and (target, passed) pairs."""
    warnings.filterwarnings("ignore", module="torch.autograd.gradcheck")
    rows, timings = [], {}
    for size, model in MODELS.items():
        checks: dict[str, Callable[[], Any]] = {}
        missing = {}
        for kind, label in (("gradcheck-fast", "gradcheck fast"), ("jax", "jax check_grads (rev)"),
                            ("harness", "harness default")):
            made = contender(f"{kind}-{size}", limit)
            if isinstance(made, str):
                missing[label] = made
            else:
                checks[label] = made
        for fn in checks.values():  # warm-up, untimed: lazy imports, vmap and XLA set-up
            fn()
        timings[size] = interleaved(checks, repeats)
        fast = timings[size]["gradcheck fast"].median
        for label, timing in timings[size].items():
            kind = {"gradcheck fast": "gradcheck-fast", "harness default": "harness"}.get(label, "jax")
            memory = peak(f"{kind}-{size}", limit) if size == "1M" else {}
            rows.append([
                f"{model.size:,} ({model.label})", label, len(timing.seconds), seconds(timing.median),
                f"{timing.median / fast:.1f}×", str(timing.last),
                mib(memory["peak_mib"]) if "peak_mib" in memory else memory.get("error", ""),
                mib(memory["peak_mib"] - memory["before_mib"]) if "peak_mib" in memory else "",
            ])
        rows.extend([f"{model.size:,} ({model.label})", label, 0, "", "", reason, "", ""] for label, reason in missing.items())

    linear_rows = []
    for factor in LINEAR_FACTORS:
        measured = peak(f"linear-{factor:g}", limit)
        linear_rows.append([
            f"weight{list(LINEAR_INDEX)} × {factor:g} ({round((factor - 1) * 100):g} %)",
            measured.get("outcome", measured.get("error", "")),
            seconds(measured["seconds"]) if "seconds" in measured else "",
            mib(measured["peak_mib"]) if "peak_mib" in measured else "",
            mib(measured["peak_mib"] - measured["before_mib"]) if "peak_mib" in measured else "",
        ])

    big = timings["1M"]
    ratio = big["harness default"].median / big["gradcheck fast"].median
    lines = [
        f"tanh MLP classifiers, softmax cross-entropy on {BIG.batch} samples, float64, CPU, given point only; "
        f"peak memory at 1M in a fresh process per contender (RSS high-water mark; 'added' = over the "
        f"process before the check); torch threads {torch.get_num_threads()}",
        "",
        table(["params", "check", "n", "median", "vs gradcheck fast", "verdict", "peak RSS", "added"], rows),
        "",
        f"nn.Linear({LINEAR_WIDTH}, {LINEAR_WIDTH}), MSE on {LINEAR_BATCH} samples, a manual weight gradient "
        f"with one element off; default mode, float64 only, given point + 3 random points, time limit "
        f"{limit:g} s, each in a fresh process:",
        table(["planted", "outcome", "time", "peak RSS", "added"], linear_rows),
        "",
    ]
    targets = [
        (f"default mode ≤ {TARGET_BIG:g}× the time of gradcheck fast at {BIG.size:,}: {ratio:.1f}×", ratio <= TARGET_BIG),
    ]
    for factor, row in zip(LINEAR_FACTORS, linear_rows):
        located = row[1].startswith("mismatch (manual)") and f"weight[{LINEAR_INDEX[0]}, {LINEAR_INDEX[1]}]" in row[1]
        targets.append((f"nn.Linear({LINEAR_WIDTH}, {LINEAR_WIDTH}) weight × {factor:g} found and located: {row[1]} "
                        f"in {row[2]}, peak {row[3]}", located))
    lines.extend(f"  {verdict(ok)}  {text}" for text, ok in targets)
    return "\n".join(lines), targets


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        _child(sys.argv[2], float(sys.argv[4]) if sys.argv[3:4] == ["--limit"] else LINEAR_LIMIT)
    else:
        text, _ = run(repeats=2 if "--quick" in sys.argv else 3)
        print(text)
