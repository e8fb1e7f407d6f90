"""The fixed cost of a tiny check (issue 22): the drop-in `gradcheck` against torch's slow and
fast gradcheck on functions of one to fifty elements, in interleaved rounds in one process
(float64, CPU, the given inputs, the drop-in's defaults). On op_db's median unit the drop-in's
time is mostly this cost, not the elements (RESULTS.md, issue 22's tenth round).

    .venv/bin/python benchmarks/run.py tiny
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

import backprop_check
from measure import interleaved, seconds, table


def functions() -> list[tuple[str, Callable[..., Any], tuple[torch.Tensor, ...]]]:
    """(name, fn, inputs): one element; then 5×5 inputs of elementwise, softmax, scan, norm and
    matmul functions at values in [-9, 9] (a third of them with a step set by |θ|)."""
    gen = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 18 - 9).requires_grad_()

    x, y, z, w = draw(5, 5), draw(5), draw(3, 4), draw(4, 2)
    return [
        ("2x, one element", lambda a: a * 2, (torch.tensor([0.3], dtype=torch.float64, requires_grad=True),)),
        ("sin, 5x5", torch.sin, (x,)),
        ("tanh(a*b), 5x5 and 5", lambda a, b: (a * b).tanh(), (x, y)),
        ("softmax, 5x5", lambda a: a.softmax(-1), (x,)),
        ("relu(a@b).sum(0), 3x4 and 4x2", lambda a, b: (a @ b).relu().sum(0), (z, w)),
        ("cumsum, 5x5", lambda a: a.cumsum(0), (x,)),
        ("norm(dim=1), 5x5", lambda a: a.norm(dim=1), (x,)),
    ]


def run(repeats: int = 15) -> tuple[str, list[tuple[str, bool]]]:
    rows = []
    for name, fn, inputs in functions():
        timings = interleaved(
            {
                "drop-in": lambda: backprop_check.gradcheck(fn, inputs),
                "slow": lambda: torch.autograd.gradcheck(fn, inputs),
                "fast": lambda: torch.autograd.gradcheck(fn, inputs, fast_mode=True),
            },
            repeats + 2,
        )
        for timing in timings.values():  # the first two calls pay first-use costs
            timing.seconds = timing.seconds[2:]
        ours, slow, fast = (timings[k].median for k in ("drop-in", "slow", "fast"))
        rows.append([name, seconds(ours), seconds(slow), seconds(fast), f"{ours / slow:.2f}×", f"{ours / fast:.1f}×"])
    text = table(["function", "drop-in", "torch slow", "torch fast", "drop-in / slow", "drop-in / fast"], rows)
    return text + "\n\n(medians of interleaved rounds; no target here: op_db's is in section 15)", []


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(run()[0])
