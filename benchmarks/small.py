"""Correct code far below 1 (issue 22's twelfth round): smooth functions whose forward computes
terms near 1 from small inputs (1 − cos x, exp x − 1 − x, log cosh x, …) at |x| ≈ 1e-1 … 1e-7,
the drop-in in reverse mode, forward mode and at order 2, where torch's gradcheck passes them
all; and the same functions behind a Function whose backward (and jvp) is off by ×1.0001, ×1.01
or −1 at one element, which must fail. Counts, no target: what finite differences in float64
can resolve there has limits (RESULTS.md).

    .venv/bin/python benchmarks/small.py
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this tree's package, as opinfo.py
import backprop_check  # noqa: E402
from measure import table  # noqa: E402

FUNCTIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "1 − cos x": (lambda x: 1 - torch.cos(x), torch.sin),
    "x − sin x": (lambda x: x - torch.sin(x), lambda x: 1 - torch.cos(x)),
    "log cosh x": (lambda x: torch.log(torch.cosh(x)), torch.tanh),
    "x − tanh x": (lambda x: x - torch.tanh(x), lambda x: torch.tanh(x) ** 2),
    "x − atan x": (lambda x: x - torch.atan(x), lambda x: x * x / (1 + x * x)),
    "√(1 + x²) − 1": (lambda x: torch.sqrt(1 + x * x) - 1, lambda x: x / torch.sqrt(1 + x * x)),
    "exp x − 1 − x": (lambda x: torch.exp(x) - 1 - x, torch.expm1),
    "log(1 + x) − x": (lambda x: torch.log(1 + x) - x, lambda x: -x / (1 + x)),
    "cosh x − 1": (lambda x: torch.cosh(x) - 1, torch.sinh),
    "σ(x) − ½": (lambda x: torch.sigmoid(x) - 0.5, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    "1 − cos x₁ + 3x₂": (lambda x: (1 - torch.cos(x)) + 3 * x.flip(0), None),
}
SCALES = (1e-1, 1e-3, 1e-5, 1e-7)
MODES = {
    "reverse": {},
    "forward": {"check_forward_ad": True, "check_backward_ad": False},
}


def slipped(f: Callable[[torch.Tensor], torch.Tensor], derivative: Callable[[torch.Tensor], torch.Tensor], factor: float) -> Callable[..., Any]:
    """f behind a Function whose backward and jvp are `derivative`, times `factor` at element 2."""

    class Slipped(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            ctx.x = x
            return f(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return grad * _wrong(derivative(x), factor)

        @staticmethod
        def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
            return tangent * _wrong(derivative(ctx.x), factor)

    return Slipped.apply


def _wrong(d: torch.Tensor, factor: float) -> torch.Tensor:
    d = d.clone()
    d[2] *= factor
    return d


def _verdict(call: Callable[[], bool]) -> str:
    try:
        return "ok" if call() else "fail"
    except backprop_check.GradcheckError:
        return "fail"
    except Exception:  # noqa: BLE001 - an error is neither
        return "error"


def run(seeds: int = 2) -> tuple[str, list[tuple[str, bool]]]:
    rows, alarms, slips = [], {}, {}
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        for scale in SCALES:
            for name, (f, derivative) in FUNCTIONS.items():
                x = (torch.randn(5, generator=gen, dtype=torch.float64) * scale).requires_grad_()
                calls = {mode: (lambda kw=kw: backprop_check.gradcheck(f, (x,), **kw)) for mode, kw in MODES.items()}
                calls["order 2"] = lambda: backprop_check.gradgradcheck(f, (x,))
                for mode, call in calls.items() if _verdict(lambda: torch.autograd.gradcheck(f, (x,))) == "ok" else ():
                    bad = _verdict(call) != "ok"
                    alarms.setdefault((scale, mode), [0, 0])
                    alarms[(scale, mode)][0] += bad
                    alarms[(scale, mode)][1] += 1
                if derivative is None:
                    continue
                for factor in (1.0001, 1.01, -1.0):
                    for mode, kw in MODES.items():
                        caught = _verdict(lambda: backprop_check.gradcheck(slipped(f, derivative, factor), (x,), **kw)) == "fail"
                        slips.setdefault((scale, mode), [0, 0])
                        slips[(scale, mode)][0] += caught
                        slips[(scale, mode)][1] += 1
    for (scale, mode), (bad, total) in sorted(alarms.items()):
        caught, planted = slips.get((scale, mode), (0, 0))
        rows.append([f"{scale:g}", mode, f"{bad} / {total}", f"{caught} / {planted}" if planted else "—"])
    text = table(["|x|", "mode", "false alarms (torch passes)", "slips caught"], rows)
    return text + "\n\n(no target: counts; RESULTS.md, issue 22's twelfth round, says what is left)", []


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(run()[0])
