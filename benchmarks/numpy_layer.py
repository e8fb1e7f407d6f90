"""Benchmark 4: a numpy layer pair, the course's checker against the harness, side by side.

The layer is the naive-loop convolution of a course assignment (`conv_forward_naive`,
`conv_backward_naive`: four nested loops over samples, filters and output positions), at the
size of the assignment's own gradient check: x (4, 3, 5, 5), w (2, 3, 3, 3), b (2,), stride 1,
pad 1, 356 input elements. The course checks it with `eval_numerical_gradient_array`, written
below as courses write it (h = 1e-5 centred differences, np.nditer over the elements, one call
per input), and a `rel_error` read by eye: 2 forward calls per element, no error bar.

The harness's numerical source estimates every element with 4 forward calls (θ ± h, θ ± h/2:
Richardson extrapolation, the error bar |D(h) − D(h/2)|/3 + rounding, and the one-sided
derivatives that tell a kink), in the in-place loop for numpy forwards. Rows:

- course: the three `eval_numerical_gradient_array` calls (dx, dw, db) at one point;
- harness numerical, in place: one numerical gradient of every input at one point, with error
  bars (`sources.numerical.gradient` on the layer's case) — the like-for-like row;
- harness numerical, generic loop: the same estimate through the loop every forward took
  before (tensor rows, a vmap attempt, the forward re-entered through `call_forward`);
- check_layer at the given point, float64 (`points=0, dtypes=["float64"]`): the course's check
  with verdict, culprit, element and error bar (and the purity guards' forward calls);
- check_layer with its defaults (the given point and 3 random points, float64 and float32).

Each row also gives the forward calls it made, and the seconds per call beyond the user's
forward (the row's median minus its calls × the median of a bare forward call, per call).
Run: `.venv/bin/python benchmarks/numpy_layer.py` (about a minute).
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measure import interleaved, seconds, table  # noqa: E402

from backprop_check import check_layer, layer  # noqa: E402
from backprop_check.model.forward import call_forward  # noqa: E402
from backprop_check.model.points import given_point  # noqa: E402
from backprop_check.sources import numerical  # noqa: E402
from backprop_check.sources.batches import Batched, Flat, evaluate  # noqa: E402

CALLS = [0]


# --- the course's layer and checker, as courses write them ----------------------------------

def conv_forward_naive(x, w, b, conv_param):
    CALLS[0] += 1
    stride, pad = conv_param["stride"], conv_param["pad"]
    N, C, H, W = x.shape
    F, _, HH, WW = w.shape
    H_out = 1 + (H + 2 * pad - HH) // stride
    W_out = 1 + (W + 2 * pad - WW) // stride
    x_pad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="constant")
    out = np.zeros((N, F, H_out, W_out))
    for n in range(N):
        for f in range(F):
            for i in range(H_out):
                for j in range(W_out):
                    window = x_pad[n, :, i * stride : i * stride + HH, j * stride : j * stride + WW]
                    out[n, f, i, j] = np.sum(window * w[f]) + b[f]
    cache = (x, w, b, conv_param)
    return out, cache


def conv_backward_naive(dout, cache):
    x, w, b, conv_param = cache
    stride, pad = conv_param["stride"], conv_param["pad"]
    N, F, H_out, W_out = dout.shape
    _, _, HH, WW = w.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="constant")
    dx_pad = np.zeros_like(x_pad)
    dw = np.zeros_like(w)
    db = dout.sum(axis=(0, 2, 3))
    for n in range(N):
        for f in range(F):
            for i in range(H_out):
                for j in range(W_out):
                    window = x_pad[n, :, i * stride : i * stride + HH, j * stride : j * stride + WW]
                    dw[f] += window * dout[n, f, i, j]
                    dx_pad[n, :, i * stride : i * stride + HH, j * stride : j * stride + WW] += w[f] * dout[n, f, i, j]
    dx = dx_pad[:, :, pad:-pad, pad:-pad] if pad else dx_pad
    return dx, dw, db


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Evaluate a numeric gradient for a function that accepts a numpy array and returns a
    numpy array."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index

        oldval = x[ix]
        x[ix] = oldval + h
        pos = f(x).copy()
        x[ix] = oldval - h
        neg = f(x).copy()
        x[ix] = oldval

        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad


def rel_error(x, y):
    return np.max(np.abs(x - y) / (np.maximum(1e-8, np.abs(x) + np.abs(y))))


# --- the contenders ---------------------------------------------------------------------------

rng = np.random.default_rng(231)
X = rng.standard_normal((4, 3, 5, 5))
W = rng.standard_normal((2, 3, 3, 3))
B = rng.standard_normal(2)
CONV = {"stride": 1, "pad": 1}
DOUT = rng.standard_normal((4, 2, 5, 5))
INPUTS = (X, W, B, CONV)


def course() -> float:
    dx_num = eval_numerical_gradient_array(lambda x: conv_forward_naive(x, W, B, CONV)[0], X, DOUT)
    dw_num = eval_numerical_gradient_array(lambda w: conv_forward_naive(X, w, B, CONV)[0], W, DOUT)
    db_num = eval_numerical_gradient_array(lambda b: conv_forward_naive(X, W, b, CONV)[0], B, DOUT)
    _, cache = conv_forward_naive(X, W, B, CONV)
    dx, dw, db = conv_backward_naive(DOUT, cache)
    return max(rel_error(dx, dx_num), rel_error(dw, dw_num), rel_error(db, db_num))


CASE = layer(conv_forward_naive, conv_backward_naive, INPUTS)
POINT = given_point(CASE, 0)


def harness_numerical() -> Any:
    return numerical.gradient(CASE, POINT, "cpu", torch.float64)


class Generic(Batched):
    """The loop a numpy forward took before the in-place one: tensor rows, `call_forward`."""

    def __init__(self, case: Any, at: Any, nodes: Any) -> None:
        def loss(values: Any) -> torch.Tensor:
            params, offsets = {k: values[k] for k in at.params}, {k: values[k] for k in nodes}
            return call_forward(case, replace(at, params=params), offsets)[0].to(torch.float64)

        super().__init__(loss)


def harness_generic() -> Any:
    problem = numerical.FiniteDifferences(CASE, POINT, torch.float64)
    generic = Generic(CASE, POINT, {name: problem.targets[name] for name in problem.nodes})
    out = {}
    for name in problem.targets:
        flat = Flat({name: problem.targets[name]})
        out[name] = evaluate(generic, problem.targets, flat, flat.join(problem.scales), torch.arange(flat.size))
    return out


def check_given() -> Any:
    return check_layer(conv_forward_naive, conv_backward_naive, INPUTS, devices=["cpu"], dtypes=["float64"], points=0)


def check_default() -> Any:
    return check_layer(conv_forward_naive, conv_backward_naive, INPUTS)


def bare_forwards() -> Any:
    """The course's 713 forward calls alone, with nothing around them: what a call costs."""
    for _ in range(BARE_CALLS):
        conv_forward_naive(X, W, B, CONV)


BARE_CALLS = 2 * (X.size + W.size + B.size) + 1


def counted(fn: Any, counts: dict[str, int], name: str) -> Any:
    """`fn`, noting in `counts[name]` how many forward calls its last run made."""

    def run() -> Any:
        CALLS[0] = 0
        value = fn()
        counts[name] = CALLS[0]
        return value

    return run


def main() -> None:
    contenders = {
        "course: eval_numerical_gradient_array ×3": course,
        "harness numerical, in place (error bars)": harness_numerical,
        "harness numerical, generic loop": harness_generic,
        "check_layer, given point, float64": check_given,
        "check_layer, defaults (4 points, f64+f32)": check_default,
        f"bare forward ×{BARE_CALLS}": bare_forwards,
    }
    calls: dict[str, int] = {}
    contenders = {name: counted(fn, calls, name) for name, fn in contenders.items()}
    started = time.perf_counter()
    repeats = {name: 3 for name in contenders} | {"check_layer, defaults (4 points, f64+f32)": 1}
    timings = interleaved(contenders, repeats)
    forward = timings[f"bare forward ×{BARE_CALLS}"].median / BARE_CALLS
    course_median = timings["course: eval_numerical_gradient_array ×3"].median
    elements = X.size + W.size + B.size
    rows = []
    for name, timing in timings.items():
        beyond = (timing.median - calls[name] * forward) / calls[name]
        rows.append([
            name, len(timing.seconds), seconds(timing.median), f"{timing.median / course_median:.2f}×",
            calls[name], f"{calls[name] / elements:.1f}", f"{beyond * 1e6:+.0f} µs",
        ])
    print(f"conv_forward_naive: x {X.shape}, w {W.shape}, b {B.shape}, stride 1, pad 1; {elements} input "
          f"elements; one forward call {forward * 1e6:.0f} µs (the bare row's median / {BARE_CALLS})")
    print(table(["check", "n", "median", "vs course", "forward calls", "calls/element", "per call beyond the forward"], rows))
    given = timings["check_layer, given point, float64"].last.results[0]
    print(f"course rel_error: {timings['course: eval_numerical_gradient_array ×3'].last:.2e} (read by eye)")
    print(f"check_layer verdict: {given.verdict}; {given.message}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
