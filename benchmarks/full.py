"""Benchmark 8: `--full` at about 22k parameters against gradcheck's slow mode (issue 11, item 5).

Both ~22k models of `speed.py`, float64, CPU, given point, in one process, interleaved:

- gradcheck slow (two forward passes per element, one at a time, plus its own bookkeeping);
- harness full (three-way: every element estimated numerically, 4 loss values each; the forward
  recorded once and replayed for one-element perturbations, `sources/replay.py`);
- "harness full, vmap of the whole forward": the same with the replay switched off, every
  perturbed loss a whole forward pass batched by vmap (what `--full` did before the replay).

The floor of whole forward passes: what they alone cost, batched by hand (no vmap, no harness):
for each weight, a batch of B perturbed copies run through the layers downstream of it
(upstream layers once, as vmap does), timed per row; × 4 evaluations × the elements of that
layer (its bias counted with it). No scheme that runs the whole forward 4 times per element can
be faster than this, and one with 2 (a plain central difference, no error bar) at best twice as
fast. The replay is not such a scheme: it recomputes only the values a perturbation changes.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

import classifier
import models
import speed
from backprop_check.sources import numerical
from measure import interleaved, seconds, table, verdict

TARGET = 10.0
FLOOR_BATCH = 256


def without_replay(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` with every perturbed loss a whole forward pass, batched by vmap."""

    def run() -> object:
        program = numerical.Batched.program
        numerical.Batched.program = lambda self, targets, flat, base: None  # type: ignore[method-assign]
        try:
            return fn()
        finally:
            numerical.Batched.program = program  # type: ignore[method-assign]

    return run


def _loss(z: Tensor, data: Mapping[str, Tensor], cross_entropy: bool) -> Tensor:
    """The loss of each batched copy: logits z of shape (B, N, classes)."""
    if cross_entropy:
        labels = data["labels"].expand(z.shape[0], -1)
        return F.cross_entropy(z.transpose(1, 2), labels, reduction="none").mean(dim=1)
    return ((z - data["Y"]) ** 2).mean(dim=(1, 2))


def floor(params: Mapping[str, Tensor], data: Mapping[str, Tensor], cross_entropy: bool) -> tuple[float, list[str]]:
    """Seconds for 4 forward passes per element, hand-batched: Σ over layers of 4·(weights +
    bias elements)·(seconds per perturbed row of that layer's weight). And a line per layer."""
    layers = len(params) // 2
    total, lines = 0.0, []
    with torch.no_grad():
        for layer in range(1, layers + 1):
            a = data["X"]
            for upstream in range(1, layer):  # unperturbed: computed once
                a = torch.tanh(a @ params[f"W{upstream}"] + params[f"b{upstream}"])
            W = params[f"W{layer}"].expand(FLOOR_BATCH, *params[f"W{layer}"].shape).clone()

            def rows(a: Tensor = a, W: Tensor = W, layer: int = layer) -> Tensor:
                z = a @ W + params[f"b{layer}"]
                for down in range(layer + 1, layers + 1):
                    z = torch.tanh(z) @ params[f"W{down}"] + params[f"b{down}"]
                return _loss(z, data, cross_entropy)

            rows()
            best = min(_timed(rows) for _ in range(3)) / FLOOR_BATCH
            elements = params[f"W{layer}"].numel() + params[f"b{layer}"].numel()
            total += 4 * elements * best
            lines.append(f"layer {layer}: {elements:,} elements × 4 × {best * 1e6:.1f} µs/row = {seconds(4 * elements * best)}")
    return total, lines


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(repeats: int = 2) -> tuple[str, list[tuple[str, bool]]]:
    warnings.filterwarnings("ignore", module="torch.autograd.gradcheck")
    mlp, wide = speed.LARGE, speed.CLASSIFIER
    contenders = {
        "mlp": (mlp, models.make_case(mlp), mlp.params(), mlp.data(), False),
        "classifier": (wide, classifier.make_case(wide), wide.params(), wide.data(), True),
    }
    speed.harness(models.make_case(speed.SMALL), full=True)  # warm-up: lazy imports, vmap set-up
    rows, targets, notes = [], [], []
    for key, (model, case, params, data, cross_entropy) in contenders.items():
        timings = interleaved(
            {
                "gradcheck slow": lambda model=model: speed.gradcheck(model, fast=False),
                "harness full": lambda case=case: speed.harness(case, full=True),
                "harness full, vmap of the whole forward": without_replay(lambda case=case: speed.harness(case, full=True)),
            },
            repeats,
        )
        bound, lines = floor(params, data, cross_entropy)
        slow = timings["gradcheck slow"].median
        for name, timing in timings.items():
            rows.append([f"{model.size:,}", name, len(timing.seconds), seconds(timing.median), timing.spread + " s",
                         f"{slow / timing.median:.2f}×", str(timing.last)])
        rows.append([f"{model.size:,}", "floor: 4 hand-batched forwards per element", "", seconds(bound), "",
                     f"{slow / bound:.2f}×", ""])
        notes.append(f"{model.label} (batch {getattr(model, 'batch', models.SAMPLES)}): " + "; ".join(lines))
        ratio = slow / timings["harness full"].median
        targets.append((f"full ≥ {TARGET:g}× faster than gradcheck slow at {model.size:,}: {ratio:.2f}× "
                        f"(floor of 4 whole forward passes an element: {slow / bound:.2f}×, of 2: "
                        f"{2 * slow / bound:.2f}×)", ratio >= TARGET))
    text = [
        f"float64, CPU, given point; torch threads {torch.get_num_threads()}; floor batch {FLOOR_BATCH} rows",
        "",
        table(["params", "check", "n", "median", "range", "vs gradcheck slow", "verdict"], rows),
        "",
        *notes,
        "",
        *(f"  {verdict(ok)}  {line}" for line, ok in targets),
    ]
    return "\n".join(text), targets
