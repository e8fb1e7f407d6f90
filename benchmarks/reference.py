"""Benchmark 10: kernels against a reference (`reference=`, issue 24).

1. Time: `check(kernel, bfloat16 inputs, reference=ref)` against a plain float64 check of the
   same function, `check(ref, float64 inputs, dtypes=["float64"])`, on the RMSNorm of
   examples/low_precision.py at 32×256 (the default points: the given one and 3 random), in
   interleaved rounds, one process, CPU. Target: within 2×.
2. False alarms: correct bfloat16 kernels, some less careful than their reference (every step
   rounded to bfloat16; a split-k matmul whose partial sums are rounded), at many random points.
   Target: none called wrong.
3. Detection: the RMSNorm kernel with one element of dw off by 1.25×, at elements drawn at random
   (trials of one point each, so each slip meets one draw of values). Reported: how many are
   caught, and the size of the missed elements against the tensor's rms.

    .venv/bin/python benchmarks/run.py reference
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

import backprop_check
from measure import interleaved, seconds, table

ROOT = Path(__file__).resolve().parent.parent
TARGET = 2.0  # a check with a reference within 2× of a plain float64 check of the same function


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LP = _load(ROOT / "examples" / "low_precision.py", "_low_precision")
sys.path.insert(0, str(ROOT / "tests"))
SOUND = _load(ROOT / "tests" / "test_reference.py", "_test_reference")


def _inputs(rows: int, width: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g).to(dtype), (1 + 0.5 * torch.randn(width, generator=g)).to(dtype)


def timing(repeats: int) -> tuple[str, bool]:
    low, wide = _inputs(32, 256, torch.bfloat16), tuple(t.double() for t in _inputs(32, 256, torch.bfloat16))
    backprop_check.check(LP.RMSNorm.apply, low, reference=LP.rms_norm_reference)  # warm: first calls load code
    backprop_check.check(LP.rms_norm_reference, wide, dtypes=["float64"])
    found = interleaved(
        {
            "float64 check of the reference": lambda: backprop_check.check(LP.rms_norm_reference, wide, dtypes=["float64"]),
            "bfloat16 kernel with reference=": lambda: backprop_check.check(LP.RMSNorm.apply, low, reference=LP.rms_norm_reference),
        },
        repeats,
    )
    plain, kernel = found.values()
    verdicts = [r.verdict for t in (plain, kernel) for r in t.last.results]
    ratio = kernel.median / plain.median
    rows = [(t.name, seconds(t.median), t.spread, ", ".join(str(r.verdict) for r in t.last.results)) for t in found.values()]
    text = table(("RMSNorm 32×256, 4 points", "median", "spread (s)", "verdicts"), rows)
    ok = ratio <= TARGET and all(v == "ok" for v in verdicts)
    return f"{text}\nratio {ratio:.2f}× (target ≤ {TARGET:g}×): {'met' if ok else 'MISSED'}", ok


def false_alarms(points: int) -> tuple[str, bool]:
    g = torch.Generator().manual_seed(3)

    def given(*shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        return tuple((2 * torch.randn(*s, generator=g)).to(torch.bfloat16) for s in shapes)

    kernels = {
        "RMSNorm (float32 inside)": (LP.RMSNorm.apply, LP.rms_norm_reference, _inputs(32, 256, torch.bfloat16, 3)),
        "softmax, every step rounded": (
            SOUND._kernel(SOUND.composite_softmax, SOUND.composite_softmax_backward), SOUND.softmax, given((16, 128)),
        ),
        "split-k matmul, partials rounded": (
            SOUND._kernel(SOUND.split_k_matmul, SOUND.split_k_backward), SOUND.matmul, given((32, 128), (128, 16)),
        ),
    }
    rows, wrong = [], 0
    for name, (kernel, reference, inputs) in kernels.items():
        (result,) = [r for r in backprop_check.check(kernel, inputs, reference=reference, points=points).results if r.verdict != "skipped"]
        worst = max(c.ratio for c in result.checks)
        wrong += result.verdict != "ok"
        rows.append((name, points + 1, str(result.verdict), f"{worst:.2f}"))
    text = table(("correct bfloat16 kernel", "points", "verdict", "closest call (× tol)"), rows)
    return f"{text}\ncalled wrong: {wrong} of {len(rows)} (target 0): {'met' if not wrong else 'MISSED'}", not wrong


def detection(trials: int) -> tuple[str, bool]:
    gen = torch.Generator().manual_seed(4)
    caught, missed = 0, []
    for trial in range(trials):
        element = int(torch.randint(0, 256, (1,), generator=gen))
        kernel = _slipped(element)
        inputs = _inputs(32, 256, torch.bfloat16, 100 + trial)
        result = [r for r in backprop_check.check(kernel, inputs, reference=LP.rms_norm_reference, points=0).results if r.verdict != "skipped"][0]
        named = any(c.name == "w" and c.index == (element,) and c.verdict == "mismatch" for c in result.checks)
        if result.verdict == "mismatch" and result.culprit == "autograd" and named:
            caught += 1
        else:
            dw = _true_dw(kernel, inputs, element)
            missed.append(dw)
    share = f"{caught} of {trials}"
    sizes = ", ".join(f"{m:.3f}" for m in sorted(missed)) or "none"
    return f"a 1.25× slip in one element of dw (256 elements), one point per trial: caught {share}; missed elements' |dw_i|/rms(dw): {sizes}", True


def _slipped(element: int) -> Any:
    class Slipped(LP.rms_norm_kernel()):  # type: ignore[misc,valid-type]
        @staticmethod
        def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dx, dw = LP.RMSNorm.backward(ctx, grad_y)
            dw = dw.float()
            dw[element] *= 1.25
            return dx, dw.to(torch.bfloat16)

    return Slipped.apply


def _true_dw(kernel: Any, inputs: tuple[torch.Tensor, ...], element: int) -> float:
    """|dw_element| / rms(dw) at the given point, with the cotangent the check drew."""
    case = backprop_check.FunctionCase(kernel, inputs, reference=LP.rms_norm_reference)
    case.problem()
    from backprop_check.model.points import given_point
    from backprop_check.sources import autograd

    point = given_point(case.twin(), 0)
    dw = autograd.gradient(case.twin(), point.rounded(torch.bfloat16), "cpu", torch.float64).values["w"]
    return float(dw[element].abs() / dw.square().mean().sqrt())


def run(quick: bool = False) -> tuple[str, list[tuple[str, bool]]]:
    time_text, time_ok = timing(2 if quick else 5)
    alarm_text, alarm_ok = false_alarms(10 if quick else 40)
    detect_text, _ = detection(10 if quick else 40)
    text = "\n\n".join([time_text, alarm_text, detect_text])
    return text, [("time within 2×", time_ok), ("no false alarm", alarm_ok)]


if __name__ == "__main__":
    print(run("--quick" in sys.argv)[0])
