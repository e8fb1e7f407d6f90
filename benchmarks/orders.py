"""Benchmark 8: second order against `torch.autograd.gradgradcheck`, forward mode against
`gradcheck(check_forward_ad=True)` (issue 13).

The function: y = tanh(x @ W) · s, x of 16×64 (1,024 input elements), W of 64×16 and s of 16
fixed, 256 output elements, through a custom Function whose backward is written by hand and is
itself differentiable (setup_context and `generate_vmap_rule`, so finite differences of both
orders run batched under vmap). A twin's backward detaches its saved output: right to first order,
wrong to the second (the classic trap).

Contenders, in interleaved rounds, in one process, float64, CPU, the given inputs only:
gradgradcheck slow and fast, `backprop_check.check(..., order=2)` in full (every element of
both orders) and in its default mode, and on the detached twin; then gradcheck with and without
check_forward_ad against `check(..., modes=("rev", "fwd"))` and `modes=("rev",)`.

    .venv/bin/python benchmarks/run.py orders
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

import backprop_check
from measure import interleaved, seconds, table

ROWS, INNER, COLS = 16, 64, 16
TARGET_FULL = 5.0  # the full second-order check ≥ 5× faster than gradgradcheck at ~1k inputs


def scaled_tanh(detach: bool = False) -> Any:
    """y = tanh(x @ W)·s with a hand-written, differentiable backward (or one that detaches)."""

    class ScaledTanh(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ W)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
            ctx.save_for_backward(inputs[1], output)
            ctx.save_for_forward(inputs[1], output)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            W, y = ctx.saved_tensors
            if detach:
                y = y.detach()
            return (grad * (1 - y * y)) @ W.T, None

        @staticmethod
        def jvp(ctx: Any, tangent_x: torch.Tensor, tangent_W: Any) -> torch.Tensor:
            W, y = ctx.saved_tensors
            return (tangent_x @ W) * (1 - y * y)

    return ScaledTanh


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, INNER, generator=gen, dtype=torch.float64).requires_grad_()
    W = torch.randn(INNER, COLS, generator=gen, dtype=torch.float64) / INNER**0.5
    return x, W


def function(detach: bool = False) -> Any:
    cls = scaled_tanh(detach)
    return lambda x, W: cls.apply(x, W)


def harness(fn: Any, **options: Any) -> str:
    report = backprop_check.check(fn, inputs(), devices=["cpu"], dtypes=["float64"], points=0, contract=(), **options)
    bad = [r for r in report.results if r.verdict != "ok"]
    if not bad:
        return "ok"
    return "; ".join(f"{r.case}: {r.verdict}{f' ({r.culprit})' if r.culprit else ''}" for r in bad)


def torch_check(check: Any, fn: Any, **options: Any) -> str:
    return "ok" if check(fn, inputs(), raise_exception=False, **options) else "mismatch"


def second_order(repeats: int) -> tuple[str, list[tuple[str, bool]]]:
    good, detached = function(), function(detach=True)
    gradgrad = torch.autograd.gradgradcheck
    contenders = {
        "gradgradcheck slow (fast_mode=False)": lambda: torch_check(gradgrad, good),
        "gradgradcheck fast (fast_mode=True)": lambda: torch_check(gradgrad, good, fast_mode=True),
        "check, order=2, full=True (both orders, every element)": lambda: harness(good, order=2, full=True),
        "check, order=2, default mode": lambda: harness(good, order=2),
        "check, order=2, default mode, backward detaches y": lambda: harness(detached, order=2),
        "gradgradcheck slow, backward detaches y": lambda: torch_check(gradgrad, detached),
    }
    timings = interleaved(contenders, {name: (1 if "slow" in name else repeats) for name in contenders})
    slow = timings["gradgradcheck slow (fast_mode=False)"].median
    rows = [[name, len(t.seconds), seconds(t.median), f"{slow / t.median:.1f}×", t.last] for name, t in timings.items()]
    full = slow / timings["check, order=2, full=True (both orders, every element)"].median
    found = timings["check, order=2, default mode, backward detaches y"].last
    targets = [
        (f"full second-order check ≥ {TARGET_FULL:g}× faster than gradgradcheck slow: {full:.1f}×", full >= TARGET_FULL),
        (f"the detached backward is found at order 2 only: {found}", found == "function (order 2): mismatch (autograd)"),
    ]
    text = table(["check", "n", "median", "vs gradgradcheck slow", "verdict"], rows)
    return text + "\n\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in targets), targets


def forward_mode(repeats: int) -> tuple[str, list[tuple[str, bool]]]:
    good = function()
    check = torch.autograd.gradcheck
    contenders = {
        "gradcheck slow": lambda: torch_check(check, good),
        "gradcheck slow, check_forward_ad=True": lambda: torch_check(check, good, check_forward_ad=True),
        "gradcheck fast, check_forward_ad=True": lambda: torch_check(check, good, check_forward_ad=True, fast_mode=True),
        "check, modes=('rev',)": lambda: harness(good),
        "check, modes=('rev', 'fwd')": lambda: harness(good, modes=("rev", "fwd")),
        "check, modes=('fwd',)": lambda: harness(good, modes=("fwd",)),
    }
    timings = interleaved(contenders, {name: (1 if "slow" in name else repeats) for name in contenders})
    base = timings["gradcheck slow, check_forward_ad=True"].median
    rows = [[name, len(t.seconds), seconds(t.median), f"{base / t.median:.1f}×", t.last] for name, t in timings.items()]
    text = table(["check", "n", "median", "vs gradcheck(check_forward_ad=True)", "verdict"], rows)
    return text, []


def run(repeats: int = 3) -> tuple[str, list[tuple[str, bool]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        harness(function(), order=2, modes=("rev", "fwd"))  # one-time imports (torch.func loads dynamo)
        first, a = second_order(repeats)
        second, b = forward_mode(repeats)
    return first + "\n\n" + second, a + b


if __name__ == "__main__":
    print(run()[0])
