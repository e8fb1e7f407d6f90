"""Benchmark 4: function mode against `torch.autograd.gradcheck` on a two-output custom Function,
and the planted-bug set of tests/corpus/functions.py.

The Function: y = tanh(x @ W), n = Σ_j y² per row, x of 32×256 and W of 256×48 (20,480 input
elements; 1,568 output elements), its backward written by hand. Written with setup_context and
`generate_vmap_rule=True`, so finite differences run batched under vmap (`mat_tanh(vmappable=
False)` builds the old-style twin, whose finite differences run one by one).

Contenders, in interleaved rounds, in one process, float64, CPU, the given inputs only:
gradcheck slow (fast_mode=False, the full Jacobian), gradcheck fast (one random projection),
`backprop_check.check(..., full=True)` (every element of Jᵀv, plus the Function contract),
`backprop_check.check(...)` in its default sampled mode, and the default mode on a backward with
one element of dW off by 0.1 %.

    .venv/bin/python benchmarks/run.py function
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

import backprop_check
from measure import interleaved, seconds, table

ROWS, INNER, COLS = 32, 256, 48
TARGET_FULL = 10.0  # the full check ≥ 10× faster than gradcheck's slow mode
TARGET_DEFAULT = 5.0  # the default mode within a small multiple of gradcheck's fast mode


def mat_tanh(bug: float = 1.0, vmappable: bool = True) -> Any:
    """The benchmark's Function; `bug` scales one element of dW."""

    def backward(ctx: Any, grad_y: torch.Tensor, grad_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, W, y = ctx.saved_tensors
        dy = grad_y + 2 * y * grad_n[:, None]
        dz = dy * (1 - y * y)
        dW = x.T @ dz
        if bug != 1.0:
            dW[100, 7] *= bug
        return dz @ W.T, dW

    if vmappable:

        class MatTanh(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(x: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                y = torch.tanh(x @ W)
                return y, (y * y).sum(-1)

            @staticmethod
            def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
                ctx.save_for_backward(inputs[0], inputs[1], output[0])

        MatTanh.backward = staticmethod(backward)
        return MatTanh

    class OldStyle(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.tanh(x @ W)
            ctx.save_for_backward(x, W, y)
            return y, (y * y).sum(-1)

    OldStyle.backward = staticmethod(backward)
    return OldStyle


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, INNER, generator=gen, dtype=torch.float64).requires_grad_()
    W = (torch.randn(INNER, COLS, generator=gen, dtype=torch.float64) / INNER**0.5).requires_grad_()
    return x, W


def harness(fn: Any, full: bool) -> str:
    report = backprop_check.check(fn, inputs(), devices=["cpu"], dtypes=["float64"], points=0, full=full)
    (result,) = report.results
    bad = [c for c in result.checks if c.verdict == "mismatch" and c.kind == "param"]
    named = [c.name for c in result.checks if c.verdict == "mismatch" and c.kind == "output"]
    where = f" at {bad[0].label} ({', '.join(named)})" if bad else ""
    return f"{result.verdict}{f' ({result.culprit})' if result.culprit else ''}{where}"


def gradcheck(fn: Any, fast: bool) -> str:
    return "ok" if torch.autograd.gradcheck(fn, inputs(), fast_mode=fast, raise_exception=False) else "mismatch"


def speed(repeats: int = 2) -> tuple[str, list[tuple[str, bool]]]:
    good, buggy = mat_tanh().apply, mat_tanh(bug=1.001).apply
    contenders = {
        "gradcheck slow (fast_mode=False)": lambda: gradcheck(good, False),
        "gradcheck fast (fast_mode=True)": lambda: gradcheck(good, True),
        "check, full=True (every element + contract)": lambda: harness(good, True),
        "check, default mode (+ contract)": lambda: harness(good, False),
        "check, default mode, planted bug dW[100, 7] × 1.001": lambda: harness(buggy, False),
    }
    counts = {name: (1 if "slow" in name else repeats) for name in contenders}
    timings = interleaved(contenders, counts)
    slow = timings["gradcheck slow (fast_mode=False)"].median
    fast = timings["gradcheck fast (fast_mode=True)"].median
    rows = [
        [name, len(t.seconds), seconds(t.median), f"{slow / t.median:.1f}×", f"{t.median / fast:.1f}×", t.last]
        for name, t in timings.items()
    ]
    full_ratio = slow / timings["check, full=True (every element + contract)"].median
    default_multiple = timings["check, default mode (+ contract)"].median / fast
    found = timings["check, default mode, planted bug dW[100, 7] × 1.001"].last
    targets = [
        (f"full check ≥ {TARGET_FULL:g}× faster than gradcheck slow: {full_ratio:.1f}×", full_ratio >= TARGET_FULL),
        (f"default mode ≤ {TARGET_DEFAULT:g}× gradcheck fast: {default_multiple:.1f}×", default_multiple <= TARGET_DEFAULT),
        (f"planted bug found and located: {found}", "W[100, 7]" in found and "(autograd)" in found),
    ]
    text = table(["check", "n", "median", "vs slow", "vs fast (×cost)", "verdict"], rows)
    return text + "\n\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in targets), targets


def planted(dtypes: tuple[str, ...] = ("float64", "float32")) -> tuple[str, list[tuple[str, bool]]]:
    """The planted-bug set: caught with culprit autograd and the right output/input/item named;
    false alarms on the twins."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tests" / "corpus" / "functions.py"
    spec = importlib.util.spec_from_file_location("_bench_functions", path)
    assert spec is not None and spec.loader is not None
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    rows, targets = [], []
    for dtype in dtypes:
        report = backprop_check.run([str(path)], devices=["cpu"], dtypes=[dtype])
        caught = alarms = bugs = twins = 0
        for result in report.results:
            expected = corpus.EXPECTED[result.case]
            if expected[0] == "ok":
                twins += 1
                alarms += result.verdict != "ok"
                continue
            bugs += 1
            kind, *what = corpus.NAMES[result.case]
            names = {c.name for c in result.checks if c.verdict == "mismatch"}
            named = f"output {what[0]} → {what[1]}" if kind == "output" else what[0]
            caught += (result.verdict, result.culprit) == ("mismatch", "autograd") and named in names
        rows.append([dtype, f"{caught}/{bugs}", f"{alarms}/{twins}", seconds(report.seconds)])
        targets.append((f"{dtype}: {caught}/{bugs} caught and named, {alarms}/{twins} false alarms", caught == bugs and alarms == 0))
    text = table(["dtype", "caught, culprit autograd, named", "false alarms on twins", "time"], rows)
    return text, targets


def run() -> tuple[str, list[tuple[str, bool]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, a = speed()
        second, b = planted()
    return first + "\n\n" + second, a + b


if __name__ == "__main__":
    print(run()[0])
