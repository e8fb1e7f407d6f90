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
from collections.abc import Callable, Collection, Mapping, Sequence

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
FUSE_UP_TO = 1024
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
    elements: Mapping[str, torch.Tensor] | None = None,
) -> Gradients:
    """dloss/dparam and dloss/dnode by finite differences, in float64 on the CPU, at the point
    as a `dtype` run sees it (its values rounded to `dtype`).

    `only` limits the work to some names; tensors larger than `sample_above` elements are
    sampled (see the module's docstring); `elements` asks for given flat indices of a name."""
    problem = Problem(case, point, dtype)
    batched, targets, scales, loss0 = problem.batched, problem.targets, problem.scales, problem.loss0
    result = Gradients("numerical", {}, loss=loss0.detach(), nodes=problem.nodes)
    if elements:
        for name, index in elements.items():
            _at_elements(result, problem, name, index)
        result.note = batched.note
        return result
    names = [name for name in targets if only is None or name in only]
    sampled = [n for n in names if sample_above is not None and targets[n].numel() > sample_above]
    for group in _groups([n for n in names if n not in sampled], targets):
        whole = Flat({n: targets[n] for n in group})  # small tensors share their batches
        f = evaluate(batched, targets, whole, whole.join(scales), range(whole.size))
        h = steps_for(whole.join(scales))
        for name, part in whole.slices.items():
            _store(result, name, _estimates(f[:, part], h[part], float(loss0), targets[name].shape))
    for name in sampled:
        gen = torch.Generator().manual_seed(derive_seed(seed, point.seed, name))
        one = Flat({name: targets[name]})
        result.directions[name] = [
            directional(batched, targets, one, scales[name], float(loss0), gen) for _ in range(DIRECTIONS)
        ]
        _at_elements(result, problem, name, torch.randperm(one.size, generator=gen)[:SAMPLES].sort().values)
    result.note = batched.note
    return result


def _at_elements(result: Gradients, problem: Problem, name: str, index: torch.Tensor) -> None:
    """Estimate the flat elements `index` of `name` only, and mark them as the ones checked."""
    target = problem.targets[name]
    one = Flat({name: target})
    checked = torch.zeros(one.size, dtype=torch.bool)
    checked[index] = True
    result.checked[name] = checked.reshape(target.shape)
    scale = one.join(problem.scales)
    f = evaluate(problem.batched, problem.targets, one, scale, index)
    _store(result, name, _estimates(f, steps_for(scale), float(problem.loss0), target.shape))


class Problem:
    """The loss as a function of every parameter and node offset, at a point as `dtype` sees it."""

    def __init__(self, case: Case, point: Point, dtype: torch.dtype) -> None:
        at = point.rounded(dtype)
        with torch.no_grad():
            loss0, tape = call_forward(case, at.params, at.data)
        nodes = {name: value.detach().to(torch.float64) for name, value in tape.values.items()}
        self.loss0 = loss0
        self.nodes = tuple(nodes)
        self.targets = {**at.params, **{name: torch.zeros_like(v) for name, v in nodes.items()}}
        self.scales = {**at.params, **nodes}

        def loss(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
            params = {k: values[k] for k in at.params}
            offsets = {k: values[k] for k in nodes}
            return call_forward(case, params, at.data, offsets)[0].to(torch.float64)

        self.batched = Batched(loss)


def blocks(case: Case, point: Point, dtype: torch.dtype, name: str, seed: int = 0) -> list[tuple[torch.Tensor, Direction]]:
    """The tensor `name` cut into about √n blocks of consecutive elements, each with the loss's
    derivative along a random sign direction inside the block: which blocks hold a wrong
    element can be told with O(√n) evaluations instead of O(n)."""
    problem = Problem(case, point, dtype)
    base = problem.targets[name]
    n = base.numel()
    size = max(1, math.isqrt(n - 1) + 1)
    gen = torch.Generator().manual_seed(derive_seed(seed, point.seed, name, "blocks"))
    h = steps_for(problem.scales[name].reshape(-1))
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    found = []
    starts = list(range(0, n, size))
    per_chunk = max(1, MAX_BATCH_ELEMENTS // max(1, len(OFFSETS) * n))
    one = Flat({name: base})
    flat = base.reshape(-1)
    for chunk in range(0, len(starts), per_chunk):
        vectors = []
        for start in starts[chunk : chunk + per_chunk]:
            d = torch.zeros(n, dtype=torch.float64)
            d[start : start + size] = signs[start : start + size] * h[start : start + size]
            vectors.append(d)
        rows = torch.stack([flat + t * d for d in vectors for t in OFFSETS])
        f = problem.batched(problem.targets, one, rows).reshape(len(vectors), len(OFFSETS)).T
        estimate = _estimates(f, torch.ones(len(vectors), dtype=torch.float64), float(problem.loss0), torch.Size([len(vectors)]))
        for i, (start, d) in enumerate(zip(starts[chunk : chunk + per_chunk], vectors)):
            direction = Direction(d.reshape(base.shape), float(estimate["value"][i]), float(estimate["error"][i]), bool(estimate["kink"][i]))
            found.append((torch.arange(start, min(n, start + size)), direction))
    return found


def _groups(names: list[str], targets: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names in groups of at most FUSE_UP_TO elements (a larger tensor alone): every perturbed
    row copies its whole group, so one group of everything would cost O(size²)."""
    groups: list[list[str]] = []
    size = FUSE_UP_TO + 1
    for name in names:
        numel = targets[name].numel()
        if size + numel > FUSE_UP_TO:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += numel
    return groups


def _store(result: Gradients, name: str, estimate: dict[str, torch.Tensor]) -> None:
    result.values[name], result.error[name] = estimate["value"], estimate["error"]
    result.left[name], result.right[name] = estimate["left"], estimate["right"]
    result.kink[name] = estimate["kink"]


class Flat:
    """Some named tensors seen as one flat vector, so that one batch perturbs any of them."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.shapes = {name: t.shape for name, t in tensors.items()}
        self.slices: dict[str, slice] = {}
        start = 0
        for name, t in tensors.items():
            self.slices[name] = slice(start, start + t.numel())
            start += t.numel()
        self.size = start

    def join(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1).to(torch.float64) for name in self.shapes]) if self.shapes else torch.zeros(0, dtype=torch.float64)

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: vector[part].reshape(self.shapes[name]) for name, part in self.slices.items()}


def directional(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    scale: torch.Tensor,
    loss0: float,
    gen: torch.Generator,
) -> Direction:
    """The derivative of the loss along d = v∘h (v random signs, h the elementwise steps)."""
    (shape,) = flat.shapes.values()
    h = steps_for(scale)
    d = (torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1) * h
    base = flat.join(targets)
    rows = torch.stack([base + t * d.reshape(-1) for t in OFFSETS])
    f = batched(targets, flat, rows).reshape(len(OFFSETS), 1)
    estimate = _estimates(f, torch.ones(1, dtype=torch.float64), loss0, torch.Size([]))
    return Direction(d, float(estimate["value"]), float(estimate["error"]), bool(estimate["kink"]))


def steps_for(scale: torch.Tensor) -> torch.Tensor:
    """A power of two near RELATIVE_STEP·max(1, |θ|) for each element: θ ± h is exact."""
    target = RELATIVE_STEP * scale.abs().clamp(min=1.0)
    return torch.exp2(torch.round(torch.log2(target)))


def evaluate(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    scale: torch.Tensor,
    index: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """The loss at θ ± h and θ ± h/2 for each element in `index` of the flat vector, as a
    (4, size) matrix (NaN for elements not in `index`)."""
    base = flat.join(targets)
    index = torch.as_tensor(index, dtype=torch.int64)
    h = steps_for(scale)
    f = torch.full((len(OFFSETS), flat.size), torch.nan, dtype=torch.float64)
    per_chunk = max(1, min(MAX_BATCH // len(OFFSETS), MAX_BATCH_ELEMENTS // max(1, len(OFFSETS) * flat.size)))
    offsets = torch.tensor(OFFSETS, dtype=torch.float64)
    for start in range(0, len(index), per_chunk):
        idx = index[start : start + per_chunk]
        rows = base.repeat(len(OFFSETS) * len(idx), 1)
        which = idx.repeat_interleave(len(OFFSETS))
        rows[torch.arange(rows.shape[0]), which] += offsets.repeat(len(idx)) * h[which]
        f[:, idx] = batched(targets, flat, rows).reshape(len(idx), len(OFFSETS)).T
    return f


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
    """Evaluates the loss for a batch of values of some tensors, with `vmap` where it works."""

    def __init__(self, loss: Loss) -> None:
        self.loss = loss
        self.vmap_works = True
        self.note: str | None = None

    def __call__(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        """The loss for each row of `batch`, a flat vector of the tensors in `flat`."""

        def one(vector: torch.Tensor) -> torch.Tensor:
            return self.loss({**targets, **flat.split(vector)})

        with torch.no_grad():
            if self.vmap_works:
                try:
                    values = torch.func.vmap(one, randomness="error")(batch)
                    # A wrong vmap rule (a custom Function's own) must not corrupt the referee.
                    if _same(values[0], one(batch[0])):
                        return values
                    raise RuntimeError("vmap gives other values than a plain call (a wrong vmap rule?)")
                except CaseTimeout:
                    raise
                except Exception as exc:  # noqa: BLE001 - an op vmap cannot batch; the loop shows real errors
                    self.vmap_works = False
                    cause = exc.__cause__ or exc
                    self.note = (
                        "the forward pass could not be batched with torch.func.vmap "
                        f"({type(cause).__name__}{': ' + str(cause) if 'vmap rule' in str(cause) else ''}); "
                        "finite differences ran one by one"
                    )
            return torch.stack([one(value) for value in batch])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a differently ordered float64 sum."""
    return bool(torch.isclose(a, b, rtol=1e-12, atol=0.0, equal_nan=True).all()) or bool(
        ((a - b).abs() <= 1e-12 * b.abs().clamp(min=1.0)).all()
    )
