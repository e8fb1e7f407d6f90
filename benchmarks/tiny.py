"""The fixed cost of a tiny check (issue 22): the drop-in `gradcheck` against torch's slow and
fast gradcheck on functions of one to fifty elements, in interleaved rounds in one process
(float64, CPU, the given inputs, the drop-in's defaults). On op_db's median unit the drop-in's
time is mostly this cost, not the elements (RESULTS.md, issue 22's tenth round). A second table
splits each check into the passes torch makes for it (fn's forward passes, backward passes,
vmap-batched calls) and the rest: what sharing or dropping passes could save at most.

    .venv/bin/python benchmarks/run.py tiny
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    text += "\n\n(medians of interleaved rounds; no target here: op_db's is in section 15)"
    return text + "\n\nWhere a tiny check's time goes (the median repeat):\n\n" + where_the_time_goes(repeats), []


@dataclass
class Spent:
    """The calls of one kind a check made, and the wall-clock seconds spent inside them."""

    calls: int = 0
    seconds: float = 0.0
    inside: list[bool] = field(default_factory=lambda: [False])

    def timed(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.inside[0]:  # nested (fn under vmap): counted once, by the outer call
                return call(*args, **kwargs)
            self.inside[0] = True
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1
                self.inside[0] = False

        return wrapper


@contextmanager
def watched() -> Iterator[dict[str, Spent]]:
    """torch.func.vmap's batched calls, torch.autograd.grad's backward passes (is_grads_batched
    among them), and fn's plain forward passes, timed while the block runs; one flag for all
    three, so that fn under vmap or a backward inside a batched call is counted once."""
    inside = [False]
    spent = {kind: Spent(inside=inside) for kind in ("fn", "backward", "vmap")}
    vmap, grad = torch.func.vmap, torch.autograd.grad
    torch.func.vmap = lambda func, *a, **k: spent["vmap"].timed(vmap(func, *a, **k))
    torch.autograd.grad = spent["backward"].timed(grad)
    try:
        yield spent
    finally:
        torch.func.vmap, torch.autograd.grad = vmap, grad


def where_the_time_goes(repeats: int) -> str:
    """Per function, the drop-in's time split into the passes torch makes for it (fn's plain
    forward passes, backward passes, vmap-batched forward passes: their calls and time) and the
    rest, the harness's own Python around them; torch's slow gradcheck beside it. Sharing or
    dropping passes can save at most the passes' share."""
    rows = []
    for name, fn, inputs in functions():
        runs = []
        for _ in range(repeats + 2):
            with watched() as spent:
                counted = spent["fn"].timed(fn)
                started = time.perf_counter()
                backprop_check.gradcheck(counted, inputs)
                runs.append((time.perf_counter() - started, spent))
        total, spent = sorted(runs[2:], key=lambda run: run[0])[len(runs[2:]) // 2]
        slow = sorted(interleaved({"slow": lambda: torch.autograd.gradcheck(fn, inputs)}, repeats + 2)["slow"].seconds[2:])
        passes = sum(s.seconds for s in spent.values())
        rows.append([
            name, seconds(total), *(f"{s.calls}, {seconds(s.seconds)}" for s in spent.values()),
            f"{seconds(total - passes)} ({(total - passes) / total:.0%})", seconds(slow[len(slow) // 2]),
        ])
    return table(["function", "drop-in", "fn (calls, time)", "backward", "vmap", "the rest", "torch slow"], rows)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(run()[0])
