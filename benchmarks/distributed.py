"""Benchmark 10: the cost of a distributed check (issue 25) at 2 and 4 ranks against a
single-process check of the function it computes.

The function: the tensor-parallel MLP of examples/tensor_parallel.py, y = tanh(x·W1)·W2 with
x of 4×16 (replicated), W1 of 16×32 split by columns and W2 of 32×8 split by rows, one
all-reduce in the forward and one in the backward (1,088 input elements). Contenders, in
interleaved rounds, default options (the given point and 3 random ones, float64 and float32,
CPU): `check(mlp, inputs)` in one process, and `check(tp_mlp, inputs, world_size=N, ...)` for
N = 2 and 4 (forked gloo ranks: start-up, the referee's batched forward passes, the ranks'
backward). Also counted: the requests the driver sent its ranks per check (one per batch of
perturbed inputs, not one per element), and the start-up of N ranks alone.

    .venv/bin/python benchmarks/run.py distributed
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import Replicate, Shard

import backprop_check
from backprop_check.engine import distributed, ranks
from measure import interleaved, seconds, table

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tensor_parallel.py"


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("_tensor_parallel_bench", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((4, 16), (16, 32), (32, 8)))


def run(repeats: int = 3) -> tuple[str, list[tuple[str, bool]]]:
    tp = _example()
    given = inputs()
    placements = dict(placements=(Replicate(), Shard(1), Shard(0)), out_placements=(Replicate(),))
    counted: dict[str, int] = {}

    def on_ranks(n: int) -> Any:
        def check() -> Any:
            requests = 0
            original = ranks.Forked.close

            def close(self: ranks.Forked) -> None:  # count before the ranks go
                nonlocal requests
                requests += self.requests
                original(self)

            ranks.Forked.close = close  # type: ignore[method-assign]
            try:
                report = backprop_check.check(tp.tp_mlp.fn, given, world_size=n, **placements)
            finally:
                ranks.Forked.close = original  # type: ignore[method-assign]
            counted[f"{n} ranks"] = requests
            return report

        return check

    def start(n: int) -> Any:
        def once() -> None:
            group = ranks.Forked(lambda request, rank, world: None, n, 60.0)
            group.close()

        return once

    timings = interleaved(
        {
            "one process: check(mlp)": lambda: backprop_check.check(tp.mlp, given),
            "2 ranks: check(tp_mlp, world_size=2)": on_ranks(2),
            "4 ranks: check(tp_mlp, world_size=4)": on_ranks(4),
            "start-up of 2 ranks alone": start(2),
            "start-up of 4 ranks alone": start(4),
        },
        repeats,
    )
    base = timings["one process: check(mlp)"].median
    rows = []
    for name, timing in timings.items():
        verdicts = ""
        if timing.last is not None:
            verdicts = ", ".join(sorted({f"{r.verdict}" for r in timing.last.results if r.verdict != "skipped"}))
        key = name.split(":")[0]
        rows.append([name, len(timing.seconds), seconds(timing.median), timing.spread, f"{timing.median / base:.1f}×",
                     counted.get(key, ""), verdicts])
    text = table(["contender", "runs", "median", "range (s)", "vs one process", "requests", "verdicts"], rows)
    all_ok = all(
        {r.verdict for r in timings[name].last.results} <= {"ok", "skipped"}
        for name in timings if timings[name].last is not None
    )
    distributed.close_all()
    return text, [("every check ok", all_ok)]


if __name__ == "__main__":
    started = time.perf_counter()
    print(run(1)[0])
    print(f"({time.perf_counter() - started:.0f}s)")
