"""The numerical source: central differences of the forward pass in float64, the referee
between the manual and the autograd gradient.

Per element θ the forward pass is evaluated at θ ± h and θ ± h/2 (h a power of two near
1e-4·max(1, |θ|), so every step is exact in float64):

- Richardson extrapolation of the two central differences, R = (4·D(h/2) − D(h))/3, cancels
  the h² error term: what is left is O(h⁴) plus rounding.
- The error bar is |D(h) − D(h/2)|/3 (the error of D(h/2), which bounds R's) plus the rounding
  of the forward pass amplified by the steps (3·ε_f/h for the four values R combines).
- One-sided differences give the left and right derivatives. On a smooth function the second
  differences scale with h (J(h) = 2·J(h/2)); at a kink they do not (J(h) ≈ J(h/2) = the jump).
  An element whose |J(h) − 2·J(h/2)| stands clear of rounding is on (or within a step of) a
  kink: the comparison then accepts any value between the left and right derivatives.

Perturbations of one tensor are evaluated in batches with `torch.func.vmap`, in chunks that
bound memory; a forward pass that cannot be batched falls back to a loop, and says so.
Nodes are perturbed by injecting an offset where `node()` marks them.

A tensor with more than `sample_above` elements is estimated at a random sample of its elements
plus random directional derivatives (the derivative along d = v∘h for a random sign vector v,
which weighs every element). The runner checks such a tensor element by element in full as
soon as either disagrees, so a report still names the element.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

import torch

from ..case import Case
from ..errors import CaseTimeout
from ..forward import call_forward
from ..points import Point, derive_seed
from . import Direction, Gradients

RELATIVE_STEP = 1e-4
# Rounding of one float64 forward pass, relative to |loss|: summing n terms costs up to ~√n eps.
FORWARD_ROUNDING = 64 * torch.finfo(torch.float64).eps
KINK_NOISE_FACTOR = 100.0
KINK_RELATIVE = 1e-7
MAX_BATCH = 512
MAX_BATCH_ELEMENTS = 1 << 23
OFFSETS = (1.0, 0.5, -0.5, -1.0)
SAMPLES = 48
DIRECTIONS = 2

Loss = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def gradient(
    case: Case,
    point: Point,
    device: str,
    dtype: torch.dtype,
    *,
    only: Collection[str] | None = None,
    sample_above: int | None = None,
    seed: int = 0,
) -> Gradients:
    """dloss/dparam and dloss/dnode by finite differences, in float64 on the CPU, at the point
    as a `dtype` run sees it (its values rounded to `dtype`).

    `only` limits the work to some names; tensors larger than `sample_above` elements are
    sampled (see the module's docstring)."""
    at = point.rounded(dtype)
    with torch.no_grad():
        loss0, tape = call_forward(case, at.params, at.data)
    nodes = {name: value.detach().to(torch.float64) for name, value in tape.values.items()}
    targets = {**at.params, **{name: torch.zeros_like(v) for name, v in nodes.items()}}
    scales = {**at.params, **nodes}

    def loss(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        params = {k: values[k] for k in at.params}
        offsets = {k: values[k] for k in nodes}
        return call_forward(case, params, at.data, offsets)[0].to(torch.float64)

    batched = Batched(loss)
    result = Gradients("numerical", {}, loss=loss0.detach(), nodes=tuple(nodes))
    for name, base in targets.items():
        if only is not None and name not in only:
            continue
        index = None
        if sample_above is not None and base.numel() > sample_above:
            gen = torch.Generator().manual_seed(derive_seed(seed, point.seed, name))
            index = torch.randperm(base.numel(), generator=gen)[:SAMPLES].sort().values
            result.directions[name] = [
                directional(batched, targets, name, base, scales[name], float(loss0), gen)
                for _ in range(DIRECTIONS)
            ]
            result.checked[name] = torch.zeros(base.shape, dtype=torch.bool).reshape(-1)
            result.checked[name][index] = True
            result.checked[name] = result.checked[name].reshape(base.shape)
        estimate = differentiate(batched, targets, name, base, scales[name], float(loss0), index)
        result.values[name], result.error[name] = estimate["value"], estimate["error"]
        result.left[name], result.right[name] = estimate["left"], estimate["right"]
        result.kink[name] = estimate["kink"]
    result.note = batched.note
    return result


def directional(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    name: str,
    base: torch.Tensor,
    scale: torch.Tensor,
    loss0: float,
    gen: torch.Generator,
) -> Direction:
    """The derivative of the loss along d = v∘h (v random signs, h the elementwise steps)."""
    h = steps_for(scale)
    d = (torch.randint(0, 2, base.shape, generator=gen, dtype=torch.float64) * 2 - 1) * h
    rows = torch.stack([base + t * d for t in OFFSETS])
    f = batched(targets, name, rows).reshape(len(OFFSETS), 1)
    estimate = _estimates(f, torch.ones(1, dtype=torch.float64), loss0, torch.Size([]))
    return Direction(d, float(estimate["value"]), float(estimate["error"]), bool(estimate["kink"]))


def steps_for(scale: torch.Tensor) -> torch.Tensor:
    """A power of two near RELATIVE_STEP·max(1, |θ|) for each element: θ ± h is exact."""
    target = RELATIVE_STEP * scale.abs().clamp(min=1.0)
    return torch.exp2(torch.round(torch.log2(target)))


def differentiate(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    name: str,
    base: torch.Tensor,
    scale: torch.Tensor,
    loss0: float,
    index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Estimate dloss/d`name` element by element (value, error bar, one-sided, kink mask), at
    every element or at the flat `index` only (the others are NaN)."""
    flat = base.reshape(-1)
    n = flat.numel()
    index = torch.arange(n) if index is None else index
    h_all = steps_for(scale.reshape(-1))
    f = torch.full((len(OFFSETS), n), torch.nan, dtype=torch.float64)
    per_chunk = max(1, min(MAX_BATCH // len(OFFSETS), MAX_BATCH_ELEMENTS // max(1, len(OFFSETS) * n)))
    for start in range(0, len(index), per_chunk):
        idx = index[start : start + per_chunk]
        rows = flat.repeat(len(OFFSETS) * len(idx), 1)
        row = torch.arange(rows.shape[0])
        which = idx.repeat_interleave(len(OFFSETS))
        offsets = torch.tensor(OFFSETS, dtype=torch.float64).repeat(len(idx))
        rows[row, which] += offsets * h_all[which]
        values = batched(targets, name, rows.reshape(-1, *base.shape))
        f[:, idx] = values.reshape(len(idx), len(OFFSETS)).T
    return _estimates(f, h_all, loss0, base.shape)


def _estimates(f: torch.Tensor, h: torch.Tensor, f0: float, shape: torch.Size) -> dict[str, torch.Tensor]:
    f_pp, f_p, f_m, f_mm = f
    d_h = (f_pp - f_mm) / (2 * h)
    d_half = (f_p - f_m) / h
    value = (4 * d_half - d_h) / 3
    level = torch.maximum(f.abs().amax(dim=0), torch.full_like(h, abs(f0)))
    rounding = FORWARD_ROUNDING * level / h
    error = (d_h - d_half).abs() / 3 + 3 * rounding
    forward_h, forward_half = (f_pp - f0) / h, (f_p - f0) / (h / 2)
    backward_h, backward_half = (f0 - f_mm) / h, (f0 - f_m) / (h / 2)
    right = 2 * forward_half - forward_h
    left = 2 * backward_half - backward_h
    jump = ((forward_h - backward_h) - 2 * (forward_half - backward_half)).abs()
    spread = torch.maximum(left.abs(), right.abs())
    largest = float(spread.nan_to_num(0.0).max()) if spread.numel() else 0.0
    floor = KINK_RELATIVE * torch.maximum(spread, torch.full_like(spread, largest * 1e-3))
    kink = (jump > KINK_NOISE_FACTOR * 20 * rounding) & (jump > floor)
    error = torch.where(torch.isfinite(value), error, torch.full_like(error, math.inf))
    return {
        "value": value.reshape(shape),
        "error": error.reshape(shape),
        "left": left.reshape(shape),
        "right": right.reshape(shape),
        "kink": kink.reshape(shape),
    }


class Batched:
    """Evaluates the loss for a batch of values of one tensor, with `vmap` where it works."""

    def __init__(self, loss: Loss) -> None:
        self.loss = loss
        self.vmap_works = True
        self.note: str | None = None

    def __call__(self, targets: Mapping[str, torch.Tensor], name: str, batch: torch.Tensor) -> torch.Tensor:
        def one(value: torch.Tensor) -> torch.Tensor:
            return self.loss({**targets, name: value})

        with torch.no_grad():
            if self.vmap_works:
                try:
                    return torch.func.vmap(one, randomness="error")(batch)
                except CaseTimeout:
                    raise
                except Exception as exc:  # noqa: BLE001 - an op vmap cannot batch; the loop shows real errors
                    self.vmap_works = False
                    cause = exc.__cause__ or exc
                    self.note = (
                        "the forward pass could not be batched with torch.func.vmap "
                        f"({type(cause).__name__}); finite differences ran one by one"
                    )
            return torch.stack([one(value) for value in batch])
