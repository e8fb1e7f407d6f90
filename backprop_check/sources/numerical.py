"""The numerical source: central differences of the forward pass in float64, the referee
between the manual and the autograd gradient.

Per element θ the forward pass is evaluated at θ ± h, θ ± h/2 and θ ± h/4 (h a power of two, so
every point is exact in float64; first near RELATIVE_STEP·max(1, |θ|), then chosen from the
function: `settle`):

- Two rounds of Richardson extrapolation of the three central differences cancel the h² and h⁴
  error terms: what is left is O(h⁶) plus rounding (`_estimates`).
- The error bar is a bound: ROUNDING_SIGMAS times the rounding the estimate carries (the
  forward's σ, measured at the point by `_measured_noise`, times the norm of the estimate's
  weights), plus the truncation predicted from the Taylor terms the six values resolve (their
  upper envelope carried on to the h⁶ term, times TRUNCATION_SAFETY).
- The step follows the function (`settle`): where the truncation outweighs the rounding, the
  step shrinks to the one that balances them; where the first step was set by |θ| (|θ| > 4),
  the terms say the step is wide, or the element looks like a kink, it is estimated again at
  steps 32× smaller until two steps agree within their bars, or the same kink holds at three
  steps down to KINK_STEP: a step wider than the function's features is taken neither for the
  derivative nor for a kink.
- One-sided differences give the left and right derivatives. On a smooth function the jump of
  the second differences falls as h³ (8× from h to h/2); at a kink it does not. An element
  whose jump at h/2 stands clear of rounding and has not fallen is on (or within a step of) a
  kink: the comparison then accepts any value between the left and right derivatives.

Perturbations are evaluated in batches with `torch.func.vmap`, in chunks that bound memory; a
forward pass that cannot be batched falls back to a loop, and says so. From REPLAY_FROM elements
on, the elementwise ones are instead replayed from one recording of the forward
(replay.py), which recomputes only the values a one-element perturbation changes; where it
cannot, or a checked row disagrees with a plain forward pass, vmap again. Nodes are perturbed by
injecting an offset where `node()` marks them.

`gradient` is the source (every element, the signature all sources share). The runner asks for
more through one entry, `reference()`, which returns a `Reference`:

- a tensor whose elementwise estimate costs more forward passes than its sampled check
  (`sampled()`) gets SAMPLES random elements and DIRECTIONS random directional derivatives
  (the derivative along d = v∘h for random signs v, which weighs every element);
- `refine(elements)` returns a new Reference with more elements estimated as precisely as the
  forward allows (their own rounding, the step that balances it with truncation, AVERAGED
  estimates averaged): where a verdict hangs on a few elements, they get the most precise
  estimate there is;
- `locate(name, direction, agrees)` finds the elements behind a disagreeing direction by
  bisection: the two halves of the direction are estimated, the halves that disagree are split
  again. One wrong element of n is found with about 2·log2(n) directional derivatives.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from backprop_check.model.case import Case
from backprop_check.errors import CaseError, CaseTimeout
from backprop_check.model.forward import call_forward
from backprop_check.model.points import Point, derive_seed
from backprop_check.sources import Direction, Gradients
from backprop_check.sources.replay import Program, Unreplayable
from backprop_check.sources.inplace import InPlace

# The first step: a power of two near RELATIVE_STEP·max(1, |θ|). The estimate is O(h⁶) (six
# values per element, two rounds of Richardson extrapolation), so its truncation is far below
# rounding at this step for a function that varies on a scale of 1 or more; one that varies
# faster shows it (`_estimates`: the corrections decrease too slowly) and gets a smaller step.
RELATIVE_STEP = 2.0**-6
NARROWER = 2.0**-7  # a first step the forward refuses is retried this much smaller (2⁻¹³)
NARROWINGS = 3  # and again, up to this many times (a matrix ≈ 1e6 + O(1): steps 2¹⁴, 2⁷, 1, 2⁻⁷)
# The forward's own rounding, measured (`_measured_noise`): the loss along NOISE_LINES lines
# through the point at NOISE_POINTS points NOISE_ULPS ulps of every input apart; the
# NOISE_ORDER-th differences there are rounding alone. Never below ROUNDING_FLOOR·|loss|: the
# final rounding of a float64 value alone has a standard deviation of ulp/√12 ≥ eps/√48.
NOISE_LINES = 4
NOISE_POINTS = 9
NOISE_ORDER = 4
NOISE_ULPS = 1024.0
NOISE_SEED = 28
# Moves of NOISE_ULPS ulps of a small element (|θ| < NOISE_WIDE_SCALE) are too small to move
# what the forward computes from it at a larger scale: exp(x) ≈ 1 at x = 1e-5 moves by 2e-18,
# below its own ulp, and its rounding, the same at every point of the lines, is invisible there,
# while the steps (2⁻⁶·max(1, |θ|)) move it across thousands of its ulps. Such elements move
# again on wide lines, NOISE_WIDE_ULPS ulps of 1 apart (1.6e-13), whose σ counts where their
# differences look like rounding (`_wide_noise`: ECnoise's test). The spacing, in ulps of 1, has
# the golden ratio's fractional part: the rounding of exp(x + kδ) ≈ exp(x) + kδ moves by 0.618
# ulp a step, and over a line the rounding errors spread like independent ones. A whole number
# of ulps would leave them as they were (exp(x + δ) − 1 − (x + δ) stands still at x = 1e-7),
# and 724.08 ulps makes them drift by 0.08 ulp a step: a line, not noise.
NOISE_WIDE_ULPS = 724 + (math.sqrt(5) - 1) / 2
NOISE_WIDE_SCALE = NOISE_WIDE_ULPS / NOISE_ULPS
NOISE_WIDE_ORDERS = 6
# Two wide lines: where the probe is a call of its own (a replayed forward, a Function vmap
# cannot batch), each of its rows is a whole forward pass, and four made a check of vocab-
# parallel cross-entropy 15 % slower; two still let the test refuse a kink one line crosses.
NOISE_WIDE_COUNT = 2
NOISE_WIDE_AGREE = 4.0
NOISE_WIDE_LINES = 16.0
NOISE_WIDE_BEYOND = 16.0  # the wide lines' σ counts where it is this many times the others'
# Monte Carlo arithmetic (`stochastic`): this many draws of every computed value's rounding,
# each applied both ways.
STOCHASTIC_PAIRS = 4
STOCHASTIC_MAGNIFY = 1024.0
JUMP_RATIO = 16.0  # the differences through the point this many times those beside it: a jump
EPS = float(torch.finfo(torch.float64).eps)
ROUNDING_FLOOR = EPS / math.sqrt(48)
# An error bar is ROUNDING_SIGMAS standard deviations of the rounding the estimate carries (the
# measured σ times the norm of its weights over the six values) plus TRUNCATION_SAFETY times the
# truncation the decrease of its corrections predicts. Both set on the accuracy sweep of
# benchmarks/referee.py (3,600 elements): the largest error seen there is 3.4 σ.
ROUNDING_SIGMAS = 6.0
TRUNCATION_SAFETY = 4.0
# A correction is resolved when it stands RESOLVED_SIGMAS of its own rounding clear; corrections
# that fall by less than WIDE per order (the terms h², h⁴, h⁶ of the error series shrinking by
# less than 4× each) say the step is not small against the function's own scale.
RESOLVED_SIGMAS = 4.0
WIDE = 0.5
# A jump in the one-sided derivatives is a kink when it stands KINK_SIGMAS of its rounding clear.
KINK_SIGMAS = 20.0
KINK_RELATIVE = 1e-7
MAX_BATCH = 512
MAX_BATCH_ELEMENTS = 1 << 23
# The rows of one batch of elementwise perturbations (float64): bounded, whatever the size.
CHUNK_BYTES = 1 << 26
OFFSETS = (1.0, 0.5, 0.25, -0.25, -0.5, -1.0)
SAMPLES = 24
# The replay of the recorded forward (replay.py) costs a recording and a few plain forward
# passes before it pays: fewer elements than this are left to vmap of the whole forward. So is a
# replay whose chunks would hold fewer perturbations than MIN_REPLAY_ROWS (its values are that
# large): two rows of every chunk are checked with a plain forward pass, which must stay cheap.
REPLAY_FROM = 64
UNBATCHED_REPLAY_FROM = 2  # ... and from this many where vmap cannot batch the forward,
# once a process has paid the replay's first recording: a tensor subclass's first dispatch
# imports torch.distributed.tensor, about FIRST_RECORDING seconds (or where the forward passes
# the replay spares take longer than that).
FIRST_RECORDING = 0.5
MIN_REPLAY_ROWS = 64
# A tiny check (fewer differentiated elements than this in all, and a plain forward pass faster
# than REPLAY_SLOW_FORWARD seconds: an op_db sample, a small loss) is left to vmap of the whole
# forward: there the recording, its checked rows and the first dispatch to its tensor subclass
# (which imports torch.distributed.tensor) cost more than the forward passes they save.
REPLAY_CASE_FROM = 2048
REPLAY_SLOW_FORWARD = 1e-3
DIRECTIONS = 2
# Forward mode's first settling round is evaluated with the first steps where that batch stays
# within MAX_BATCH rows and this many input or output elements (`along_many`'s `ahead`).
AHEAD_ELEMENTS = 1 << 18
FUSE_UP_TO = 1024
# Step multipliers (powers of two: θ ± m·h stays exact) tried where precision matters most.
REFINE_STEPS = (1.0, 8.0, 0.125)
# A direction's step multipliers: its O(h⁶) estimate at the elements' own steps and 8× below.
DIRECTION_STEPS = (1.0, 0.125)
# A step wider than the function's features looks like a kink (the one-sided derivatives
# part) or gives an estimate a smaller step disagrees with: such elements are estimated again at
# steps SHRINK times smaller, at most SHRINKS times (32⁻⁸ = 2⁻⁴⁰: from 2⁻⁶·|θ| at a Unix
# timestamp down to a spread of 1e-3), never below STEP_FLOOR_ULPS ulps of θ.
SHRINK = 1.0 / 32
# Elements beyond this size have a step set by their value (RELATIVE_STEP·|θ|): always checked
# once at a smaller step. Below it the step is RELATIVE_STEP whatever θ, and only kinks, wide
# steps and bars that are mostly truncation cost more.
VALIDATE_FROM = 4.0
# A step set by θ's size is confirmed down to this one (`settle`): a power-of-two step that is a
# multiple of half a feature's period reads it exactly as a line (frac, floor and round at 1e3,
# period 1), and below a quarter no feature of period 1 or more can be read so.
CONFIRM_STEP = 2.0**-2
# A loss that stands still on the noise lines is a staircase of its own (a quantizer: ceil,
# round(x·256)/256) where it still stands still when every input moves by this much of itself;
# a smooth function computed in float32 (x.float()) is a staircase too, of float32's rounding
# (2⁻²⁴ of the value), finer than this: read at wide steps, as any smooth function.
STAIR_MOVE = 2.0**-20
SHRINKS = 8
STEP_FLOOR_ULPS = 256.0
# A kink whose one-sided derivatives moved less than this fraction of its jump when the step
# shrank 32× is a real kink (a smooth feature wider than the step moves them as the step does).
KINK_STABLE = 0.1
KINK_STEPS = 3
KINK_STEP = 2.0**-23  # a kink is confirmed at a step this small (three steps below 1e-4)
KINK_ULPS = 2.0**16
# The few elements a verdict hangs on (`Reference.refine`) are estimated this many times over at
# nearby steps and averaged: the bar's rounding part falls as √(AVERAGED/4).
AVERAGED = 32
# Bisection stops at groups this small (checked element by element) or this many groups.
LEAF = 8
MAX_GROUPS = 8

Loss = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
# The loss at the base values with some tensors set to each of their rows: (values, {name: (rows, *shape)}) → (rows,)
Linear = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


def gradient(case: Case, point: Point, device: str, dtype: torch.dtype) -> Gradients:
    """dloss/dparam and dloss/dnode at every element by finite differences, in float64 on the
    CPU, at the point as a `dtype` run sees it (its values rounded to `dtype`), each as precise
    as the steps can make it (no `PRECISE_ENOUGH`: no verdict to be enough for)."""
    return reference(case, point, dtype, full=True, tighten=False, precise=True).gradients


def reference(
    case: Case, point: Point, dtype: torch.dtype, *, full: bool = False, seed: int = 0, tighten: bool = True,
    precise: bool = False,
) -> Reference:
    """The numerical reference at a point: every element of the tensors cheap to estimate that
    way (all of them when `full`), samples and directions for the others; with `tighten`, the
    elements whose error bar would decide their verdict re-estimated at the refinement steps;
    with `precise`, no bar is left at PRECISE_ENOUGH of the tolerance."""
    differences = FiniteDifferences(case, point, dtype, precise=precise)
    sampled = set() if full else {name for name, t in differences.targets.items() if is_sampled(t.numel())}
    result = Gradients("numerical", {}, loss=differences.loss0.detach(), nodes=differences.nodes)
    held = held_fixed(differences.targets)
    whole = [name for name in differences.targets if name not in sampled and name not in held]
    for group in _groups(whole, differences.targets):
        _store(result, differences.estimate(group), differences.targets, mask=None)
    if tighten:
        _tighten(result, differences, whole)
    for name in held:
        if name not in sampled:
            index = held[name].reshape(-1).logical_not().nonzero().reshape(-1)
            _store(result, differences.estimate([name], {name: index}), differences.targets, mask={name: index})
    for name in sampled:
        gen = torch.Generator().manual_seed(derive_seed(seed, point.seed, name))
        size = differences.targets[name].numel()
        vectors = [differences.random_direction(name, gen) for _ in range(DIRECTIONS)]
        finite = torch.arange(size)
        if name in held:  # a direction moves no infinite element, and no sample is one
            vectors = [v.masked_fill(held[name], 0.0) for v in vectors]
            finite = held[name].reshape(-1).logical_not().nonzero().reshape(-1)
        result.directions[name] = differences.along(name, vectors)
        index = finite[torch.randperm(finite.numel(), generator=gen)[:SAMPLES]].sort().values
        _store(result, differences.estimate([name], {name: index}), differences.targets, mask={name: index})
    notes = [differences.batched.note] if differences.batched.note else []
    if held:
        counts = ", ".join(f"{int(mask.sum())} of `{name}`" for name, mask in held.items())
        notes.append(
            f"non-finite input elements ({counts}: inf or nan, as the -inf of an attention mask) are held fixed: "
            "a finite step does not move them, so their gradient is not checked; every other element is"
        )
    if differences.cancelled:
        notes.append(
            f"the loss stands still at exactly 0 where its terms reach {differences.cancelled:.3g} (it cancels them): "
            "the finite differences resolve its gradient only to the rounding of those terms"
        )
    result.note = "; ".join(notes) or None
    return Reference(differences, result)


# An element's error bar is loose when ERROR_BARS of it outweigh float64's rtol·|value| and
# atol·(the tensor's largest): the verdict on that element would hang on the bar alone.
LOOSE_BARS, LOOSE_RELATIVE, LOOSE_OF_LARGEST = 4.0, 1e-7, 1e-9
# An element whose LOOSE_BARS bars are below this fraction of LOOSE_RELATIVE·|value| (of the
# smallest rtol a case sets, where smaller) is precise enough: a smaller step would move the
# allowance its verdict is judged by less than that fraction, so `settle` takes none for
# precision's sake (it still does for every check it makes: kinks, staircases, a step set by
# the size of θ). A sigmoid's bar of 1e-11 of its value took a second batched forward pass.
PRECISE_ENOUGH = 2.0**-6
# At most this many of a tensor's loosest elements are re-estimated (three steps each), which
# bounds what the refinement adds to a full check of a large tensor.
MAX_TIGHTENED = 256


def _tighten(result: Gradients, differences: FiniteDifferences, names: Sequence[str]) -> None:
    """Re-estimate at the refinement steps (1, 8, ⅛) the elements estimated at one step whose
    error bar is loose (a steep function near its domain's edge: atanh at 0.996, where one
    step's bar is 1e-4 of the value and a wrong element by 1e-4 would hide under it)."""
    for name in names:
        value, error = result.values[name].reshape(-1), result.error[name].reshape(-1)
        largest = float(value.abs().nan_to_num(0.0).max()) if value.numel() else 0.0
        allowed = LOOSE_RELATIVE * value.abs() + LOOSE_OF_LARGEST * largest
        looseness = torch.where(torch.isfinite(value), LOOSE_BARS * error / allowed.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        index = (looseness > 1).nonzero().reshape(-1)
        if index.numel() > MAX_TIGHTENED:
            index = index[looseness[index].topk(MAX_TIGHTENED).indices].sort().values
        if index.numel():
            estimate = differences.estimate([name], {name: index}, steps=REFINE_STEPS)
            current = {key: store[name].reshape(-1)[index] for key, store in
                       zip(("value", "error", "left", "right", "kink"), (result.values, result.error, result.left, result.right, result.kink))}
            whole = name not in result.checked
            _store(result, {name: _better(current, estimate[name])}, differences.targets, mask={name: index})
            if whole:  # still every element estimated, not a sample
                result.checked.pop(name, None)


def _smallest_rtol(rtol: object, default: float) -> float:
    """The smallest of `default` and the rtol a case sets (a number, or one per dtype name)."""
    given = rtol.values() if isinstance(rtol, Mapping) else [rtol]
    numbers = [float(value) for value in given if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return min([default, *(value for value in numbers if value >= 0)])


def held_fixed(targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per tensor with non-finite elements, where they are: no finite difference moves an
    infinite value (−inf + h is −inf), so those elements are held fixed and not estimated."""
    return {name: ~torch.isfinite(t) for name, t in targets.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())}


def is_sampled(size: int) -> bool:
    """Whether a tensor of `size` elements is checked by samples and directions: when that
    costs fewer forward passes than estimating every element."""
    return size > SAMPLES + DIRECTIONS * len(REFINE_STEPS)


@dataclass(frozen=True)
class Reference:
    """The numerical gradients at one point and the means to estimate more there."""

    differences: FiniteDifferences
    gradients: Gradients

    def refine(self, elements: Mapping[str, torch.Tensor]) -> Reference:
        """A new Reference with the flat `elements` of each name estimated at their best step;
        those whose bar is still loose (LOOSE_BARS of it above LOOSE_RELATIVE·|value|: the forward
        keeps few digits there) again, as precisely as the forward allows (`estimate`'s `alone`)."""
        wanted = {name: index for name, index in elements.items() if index.numel()}
        if not wanted:
            return self
        merged = self.gradients.copy()
        for name, index in wanted.items():
            estimate = self.differences.estimate([name], {name: index}, steps=REFINE_STEPS)
            _store(merged, estimate, self.differences.targets, mask={name: index})
            mine = estimate[name]
            loose = index[(LOOSE_BARS * mine["error"] > LOOSE_RELATIVE * mine["value"].abs()) & ~mine["kink"]]
            if loose.numel():
                precise = self.differences.estimate([name], {name: loose}, steps=REFINE_STEPS, alone=True)
                _store(merged, precise, self.differences.targets, mask={name: loose})
        return Reference(self.differences, merged)

    def locate(self, name: str, direction: Direction, agrees: Callable[[Direction], bool]) -> torch.Tensor:
        """The flat indices of `name` behind a disagreeing `direction`: halves are estimated along
        the same signs and the disagreeing ones split again (at most MAX_GROUPS at a time),
        down to LEAF elements. Empty when no half disagrees (errors spread so thinly that no
        part of the direction shows them)."""
        vector = direction.vector.reshape(-1)
        groups = [torch.arange(vector.numel())]
        while any(g.numel() > LEAF for g in groups):
            small = [g for g in groups if g.numel() <= LEAF]
            halves = [h for g in groups if g.numel() > LEAF for h in (g[: g.numel() // 2], g[g.numel() // 2 :])]
            masked = []
            for half in halves:
                part = torch.zeros_like(vector)
                part[half] = vector[half]
                masked.append(part.reshape(direction.vector.shape))
            # A half is shorter, so the step that suited the whole direction suits it too.
            found = self.differences.along(name, masked, steps=(direction.step,))
            bad = [half for half, d in zip(halves, found) if not agrees(d)]
            if not bad and not small:
                return torch.zeros(0, dtype=torch.int64)
            groups = small + bad[: max(0, MAX_GROUPS - len(small))]
        return torch.cat(groups).sort().values


class FiniteDifferences:
    """The loss as a function of every parameter and node offset, at a point as `dtype` sees it."""

    def __init__(self, case: Case, point: Point, dtype: torch.dtype, precise: bool = False) -> None:
        at = point.rounded(dtype)
        with torch.no_grad():
            loss0, tape = call_forward(case, at)
        nodes = {name: value.detach().to(torch.float64) for name, value in tape.values.items()}
        self.loss0 = loss0
        self.nodes = tuple(nodes)
        self.targets = {**at.params, **{name: torch.zeros_like(v) for name, v in nodes.items()}}
        self.scales = {**at.params, **nodes}
        # The relative tolerance a verdict on these estimates uses at the least (`PRECISE_ENOUGH`);
        # `precise`: every bar as small as the steps make it (the plain numerical gradient).
        self.relative = _smallest_rtol(case.rtol, LOOSE_RELATIVE)
        self.precise = precise

        def loss(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
            params = {k: values[k] for k in at.params}
            offsets = {k: values[k] for k in nodes}
            return call_forward(case, replace(at, params=params), offsets)[0].to(torch.float64)

        # numpy case: no vmap, no tensor rows; each element perturbed in place (inplace.py)
        linear = case.linear_names() if not case.numpy and not nodes else ()  # used where vmap cannot batch

        def rows(values: Mapping[str, torch.Tensor], moved: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return case.linear_rows(replace(at, params={k: values[k] for k in at.params}), moved)

        self._loss = None if case.numpy else loss  # `terms`: the forward traced once, where asked
        self.batched = InPlace(case, at, nodes) if case.numpy else Batched(loss, vmap=case.batchable, linear=(frozenset(linear), rows) if linear else None)
        # The rounding probes: not through `batched`, which decides alone how perturbations run.
        self._plain = self.batched if case.numpy else _Probes(loss, case.batchable)
        if not case.numpy:  # vmap's row at the point is checked against this plain pass
            self.batched.at_point = self._plain.at_point = loss0.detach().to(torch.float64)
        self._noise: tuple[float, bool] | None = None
        self._stairs: bool | None = None
        self.cancelled: float | None = None  # the terms' scale, where the loss stood still at exactly 0

    @property
    def noise(self) -> tuple[float, bool]:
        """The forward's rounding σ when every input moves (`_measured_noise`, once), and whether
        the loss did not move at all: a staircase wider than those moves. Every input, not one
        tensor: the rounding of x − mean at x ≈ 1e6 is a bias in ∂loss/∂w that moving w alone
        cannot show, and its size is the loss's noise when x moves."""
        if self._noise is None:
            self._measured(self._probe(self.targets))
        assert self._noise is not None
        return self._noise

    @property
    def stairs(self) -> bool:
        """Whether the loss is a staircase of its own: it stood still on the noise lines, and
        still does at one at least of the points every input moved by ±1 or ±2 times STAIR_MOVE
        of itself (a function computed in float32 moves at every one, across many of its
        stairs). Measured once, where the noise lines stood still; for directions, which move
        many elements at once (`_coarse` asks element by element)."""
        if self._stairs is None:
            self._stairs = False
            if self.noise[1]:
                flat = Flat(dict(self.targets))
                rows = _stair_rows(flat.join(self.targets), flat.join(self.scales))
                try:
                    values = None if rows is None else self._plain(self.targets, flat, rows)
                except CaseTimeout:
                    raise
                except Exception:  # noqa: BLE001 - the forward's own error is reported by the plain pass
                    values = None
                f0 = float(self.loss0)
                self._stairs = values is not None and bool((values.to(torch.float64) == f0).any())
        return self._stairs

    def _coarse(self, whole: Flat, chosen: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Per element in `chosen`, whether the loss stands still at one at least of the points
        θ ± STAIR_MOVE·max(1, |θ|), θ ± half and a quarter of it, the element alone moved: a
        staircase of its own there (one stair crossed near its edge moves some of them, not
        all), not the rounding of a function computed in float32 (every one moves, across many
        of its stairs). Element by element: with many elements moving at once, some cross."""
        h = torch.ones(whole.size, dtype=torch.float64)
        h[chosen] = STAIR_MOVE * scale[chosen].abs().clamp(min=1.0)
        try:
            f = evaluate(self.batched, self.targets, whole, h, chosen)
        except CaseTimeout:
            raise
        except CaseError:  # fn refuses a point that far (a domain's edge): no staircase said
            return torch.zeros(chosen.numel(), dtype=torch.bool)
        return (f[:, chosen] == float(self.loss0)).any(dim=0)

    def _measured(self, found: tuple[float, bool, bool]) -> None:
        """Keep the probe of every input (`found`: σ, still, jumps) as the forward's noise."""
        sigma, still, jumps = found
        if jumps:
            # The loss jumps at the point itself (a ±1 label that requires grad: off ±1 the
            # loss takes another branch): σ and still are read beside the point (`_noise_of`).
            # The tensors that make it jump are left out of the probe where others remain
            # (their own elements show the jump as a kink), so that those are measured whole.
            smooth = {name: t for name, t in self.targets.items() if not self._probe({name: t})[2]}
            if smooth:
                sigma, still, _ = self._probe(smooth)
        if still and float(self.loss0) == 0.0:
            # A loss that stands still at exactly 0 has no ulp to speak of: its rounding is that
            # of the terms it cancels (a cross-entropy whose logits of 2e5 leave log(1 + 1e-20),
            # computed as 0, where the true gradient is 1e-20), not of its value.
            self.cancelled = self.terms()
            sigma = max(sigma, ROUNDING_FLOOR * self.cancelled)
        elif still and self._loss is not None:
            # Beside 0 it may round at a larger scale than its value too: 1 − cos(x) at x = 1e-5
            # is 5e-11, rounded at the ulp of cos(x) ≈ 1, which no line moved; its steps were
            # narrowed below that ulp, where the loss is flat, and read a gradient of 0. What
            # float64's rounding of every value the forward computes does to the loss says
            # (`stochastic`: cos(x)'s moves the loss by eps, atan(2e6)'s input's by nothing).
            loss, targets = self._loss, self.targets
            moved = _float64_rounding(lambda: loss(targets).reshape(1))
            sigma = max(sigma, float(moved[0])) if moved is not None else sigma
        self._noise = (sigma, still)

    def terms(self) -> float:
        """The largest magnitude among the inputs and the values the forward computes from them
        (`terms_scale`): the scale its rounding lives at where the loss itself is 0."""
        loss = self._loss  # numpy: nothing to trace, the inputs alone
        return terms_scale(None if loss is None else lambda: loss(self.targets), *self.scales.values())

    def _probe(self, moved: Mapping[str, torch.Tensor]) -> tuple[float, bool, bool]:
        return _measured_noise(self._plain, moved, self.targets, Flat(dict(moved)).join(self.scales), float(self.loss0))

    def _probe_rows(self, whole: Flat, count: int) -> torch.Tensor | None:
        """The noise probe's rows (`_noise_rows`), where they can share the batched call that
        estimates `count` elements of `whole`: the noise is still to measure, `whole` is every
        input in order, and that call runs the forward under vmap (not the replay, not one
        pass at a time). One call where there were two: for a tiny check, a call's own cost
        (vmap's set-up, the plain pass that checks its first row) is most of it."""
        if self._noise is not None or list(whole.shapes) != list(self.targets):
            return None
        if not isinstance(self.batched, Batched) or not self.batched.vmap_works:
            return None
        base = whole.join(self.targets)
        if _program(self.batched, self.targets, whole, base, count) is not None:
            return None
        return _noise_rows(base, whole.join(self.scales))

    def estimate(
        self,
        names: Sequence[str],
        index: Mapping[str, torch.Tensor] | None = None,
        steps: Sequence[float] = (1.0,),
        alone: bool = False,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per name, the estimates (value, error, left, right, kink) at the flat elements `index`
        (every element without one), fused into shared batches. With several step multipliers,
        each element keeps the estimate with the smallest error bar off a kink. With `alone`,
        each element's bar is built from the rounding the loss shows when that element alone
        moves (`_own_noise`), not every input: the few elements a verdict hangs on."""
        whole = Flat({n: self.targets[n] for n in names})
        scale = whole.join(self.scales)
        if index is None:
            chosen = torch.arange(whole.size)
        else:
            chosen = torch.cat([index[n].to(torch.int64) + whole.slices[n].start for n in names])
        best: dict[str, torch.Tensor] | None = None
        found: list[dict[str, torch.Tensor]] = []
        rows = None if alone else self._probe_rows(whole, len(chosen))
        if rows is None:
            sigma, still = self.noise
        first = [steps_for(scale) * multiplier for multiplier in steps]

        def attempt(factor: float) -> tuple[list[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor | None, Known | None]]:
            hs = [h * factor for h in first]
            return hs, evaluate_steps(self.batched, self.targets, whole, hs, chosen, extra=rows, ahead=_ahead(scale, chosen, hs))

        # fn refuses a point a first step away (a probability p ± h outside [0, 1]): the steps
        # a kink is confirmed at, where the old fixed steps were; settled from there.
        hs, (evaluated, probed, known) = _narrowed(attempt)
        if rows is not None:
            f0 = float(self.loss0)
            self._measured(_noise_of(probed, f0, _noise_floor(f0)) if probed is not None else self._probe(self.targets))
            sigma, still = self.noise
        if alone:
            sigma = self._own_noise(whole, chosen, scale)
        for h, f in zip(hs, evaluated):
            estimate = _estimates(f[:, chosen], h[chosen], float(self.loss0), scale[chosen], sigma)
            estimate["step"] = h[chosen]
            found.append(estimate)
            best = estimate if best is None else _better(best, estimate)
        assert best is not None
        # Steps whose estimates disagree beyond their bars straddle a feature of the function
        # (a staircase of stairs between them looks like a slope at the wider step, with the
        # smaller bar): the smallest bar is then no proof, and `settle` checks smaller steps.
        for a, b in zip(found, found[1:]):
            apart = (a["value"] - b["value"]).abs() > a["error"] + b["error"]
            best["flat"] = best["flat"] | (apart & ~a["kink"] & ~b["kink"])
        # The loss did not move when every input moved by NOISE_ULPS ulps, nor by STAIR_MOVE of
        # itself: a staircase whose stairs may be finer than the step, or a multiple of them; a
        # slope seen at the step is checked at smaller ones, down to the kink step (`settle`'s
        # confirm).
        sloped = best["value"].abs() > 16 * best["rounding"]
        best["flat"] = best["flat"] | (still & sloped)
        stairs = self._coarse(whole, chosen, scale) & sloped if still and bool(sloped.any()) else None
        # Not finite a first step away (asin at 0.99, θ + h past the domain's edge): smaller
        # steps, as for any step wider than the function allows.
        best["flat"] = best["flat"] | ~torch.isfinite(best["value"])
        best = self._settled(whole, scale, chosen, best, sigma, stairs, known, precise=self.precise or alone or len(steps) > 1)
        if alone:
            best = self._widened(whole, scale, chosen, best, sigma)
            # Rounding that does not change as the element moves (x − mean at x ≈ 1e6, seen from
            # a weight that multiplies it) is a bias in its slope that its own noise cannot show:
            # at most the loss's rounding when everything moves, over the element's size.
            size = torch.maximum(scale[chosen].abs(), scale.abs().square().mean().sqrt()).clamp(min=torch.finfo(torch.float64).tiny)
            bias = ROUNDING_SIGMAS * self.noise[0] / size
            best["error"] = best["error"] + torch.where(best["kink"], 0.0, bias)
        best.pop("step")
        out: dict[str, dict[str, torch.Tensor]] = {}
        offset = 0
        for name in names:
            count = whole.slices[name].stop - whole.slices[name].start if index is None else index[name].numel()
            out[name] = {part: values[offset : offset + count] for part, values in best.items()}
            offset += count
        return out

    def _settled(
        self, whole: Flat, scale: torch.Tensor, chosen: torch.Tensor, best: dict[str, torch.Tensor], sigma: float | torch.Tensor,
        stairs: torch.Tensor | None = None, known: Known | None = None, precise: bool = False,
    ) -> dict[str, torch.Tensor]:
        """`settle` the elementwise estimates: each round re-estimates the unsettled elements
        at a smaller step (6 forward passes each), never below STEP_FLOOR_ULPS
        ulps of θ. Elements whose step is RELATIVE_STEP·|θ| with |θ| > VALIDATE_FROM (a step set by the
        value, not by the function), and those where the function is flat between two stencil
        points (a staircase), are always checked at smaller steps, down to CONFIRM_STEP and to
        the kink step (`settle`'s confirm). A bar within PRECISE_ENOUGH of the tolerance is
        not narrowed for precision alone, unless `precise` (the few elements a verdict hangs
        on, at the refinement steps)."""
        theta = scale[chosen]

        def evaluated(elements: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            full = torch.ones(whole.size, dtype=torch.float64)
            full[elements] = h
            return evaluate(self.batched, self.targets, whole, full, elements)[:, elements]

        def at(where: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
            f = evaluated(chosen[where], h) if known is None else known.rows(evaluated, chosen[where], h)
            own = sigma[where] if isinstance(sigma, torch.Tensor) else sigma
            return _estimates(f, h, float(self.loss0), theta[where], own)

        # Where θ is large, its own rounding hides a kink at small steps: the step must
        # still be KINK_ULPS ulps of θ.
        small = torch.maximum(torch.full_like(theta, KINK_STEP), _step_floor(theta) * (KINK_ULPS / STEP_FLOOR_ULPS))
        sized = theta.abs() > VALIDATE_FROM
        confirm = _confirmed_at(sized, torch.full_like(theta, CONFIRM_STEP), stairs, small)
        enough = None if precise else PRECISE_ENOUGH * self.relative / LOOSE_BARS * best["value"].abs().nan_to_num(0.0)
        return settle(best, at, _step_floor(theta), sized | best["flat"], small, confirm, enough)

    def _widened(
        self, whole: Flat, scale: torch.Tensor, chosen: torch.Tensor, best: dict[str, torch.Tensor], sigma: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """A settled estimate whose bar is mostly rounding is taken again at a wider step, the
        one that balances the two (`settle` moves by 32× and may have passed it), and kept where
        it agrees with the settled one within both bars, off a kink, with a smaller bar."""
        grow = torch.exp2(torch.floor(torch.log2((best["rounding"] / (64 * best["truncation"]).clamp(min=1e-300)) ** (1 / 7))))
        grow = grow.nan_to_num(1.0).clamp(max=1 / SHRINK / 2)
        where = ((grow >= 2) & ~best["kink"] & torch.isfinite(best["value"])).nonzero().reshape(-1)
        if not where.numel():
            return best
        h = best["step"][where] * grow[where]
        full = torch.ones(whole.size, dtype=torch.float64)
        full[chosen[where]] = h
        f = evaluate(self.batched, self.targets, whole, full, chosen[where])
        other = _estimates(f[:, chosen[where]], h, float(self.loss0), scale[chosen][where], sigma[where])
        other["step"] = h
        was = {k: v[where] for k, v in best.items()}
        take = (
            ~other["kink"] & ~other["wide"] & (other["error"] < was["error"])
            & ((other["value"] - was["value"]).abs() <= other["error"] + was["error"])
        )
        for key in best:
            best[key][where] = torch.where(take, other[key], was[key])
        return self._averaged(whole, scale, chosen, best, sigma)

    def _averaged(
        self, whole: Flat, scale: torch.Tensor, chosen: torch.Tensor, best: dict[str, torch.Tensor], sigma: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Where rounding dominates a bar, AVERAGED estimates at steps a little smaller than the
        chosen one (h·(1 − j/64): a new rounding each, the same function) are averaged, and
        the rounding part of the bar falls as √(AVERAGED/4) (a quarter of the draws counted:
        their roundings need not be independent); the truncation part stays that of the widest."""
        where = (~best["kink"] & torch.isfinite(best["value"]) & (best["rounding"] > best["truncation"])).nonzero().reshape(-1)
        if not where.numel():
            return best
        h = best["step"][where]
        values = [best["value"][where]]
        for j in range(1, AVERAGED):
            full = torch.ones(whole.size, dtype=torch.float64)
            full[chosen[where]] = h * (1 - j / 64)
            f = evaluate(self.batched, self.targets, whole, full, chosen[where])
            values.append(_estimates(f[:, chosen[where]], h * (1 - j / 64), float(self.loss0), scale[chosen][where], sigma[where])["value"])
        value = torch.stack(values).mean(dim=0)
        rounding = best["rounding"][where] / (1 - (AVERAGED - 1) / 64) / math.sqrt(AVERAGED / 4)
        best["value"][where] = value
        best["rounding"][where] = rounding
        best["error"][where] = best["truncation"][where] + rounding
        return best

    def _own_noise(self, whole: Flat, chosen: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Per chosen element, the σ of the loss's rounding when that element alone moves
        (`_measured_noise` along its own axis, 2·NOISE_POINTS − 1 points; for an element smaller
        than NOISE_WIDE_SCALE, what its wide line shows beyond that, `_beyond`); every input's σ
        where the probes cannot run, or where the loss stood still on the element's own line (no
        rounding seen there: every input's says what the forward rounds, `_measured`)."""
        sigma, _ = self.noise
        count = 2 * NOISE_POINTS - 1
        base = whole.join(self.targets)
        size = scale[chosen].abs()
        small = ((size > 0) & (size < NOISE_WIDE_SCALE)).nonzero().reshape(-1)
        lines = torch.cat([chosen, chosen[small]])
        offsets = torch.arange(1, count + 1, dtype=torch.float64) * (NOISE_ULPS * torch.finfo(torch.float64).eps)
        rows = base.repeat(count * lines.numel(), 1)
        line = torch.arange(rows.shape[0])
        which = lines.repeat_interleave(count)
        spacing = torch.cat([size, torch.full((small.numel(),), NOISE_WIDE_SCALE, dtype=torch.float64)]).repeat_interleave(count)
        rows[line, which] = base[which] + offsets.repeat(lines.numel()) * spacing
        try:
            values = self.batched(self.targets, whole, rows).to(torch.float64).reshape(lines.numel(), count)
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - the forward's own error is reported by the plain pass
            return torch.full((chosen.numel(),), sigma, dtype=torch.float64)
        values, wide = values[: chosen.numel()], values[chosen.numel() :]
        differences = torch.cat([torch.full((chosen.numel(), 1), float(self.loss0), dtype=torch.float64), values], dim=1)
        for _ in range(NOISE_ORDER):
            differences = differences[:, 1:] - differences[:, :-1]
        squares = (differences**2 / math.comb(2 * NOISE_ORDER, NOISE_ORDER)).nan_to_num(math.inf, posinf=math.inf)
        own = squares.mean(dim=1).sqrt().clamp(min=ROUNDING_FLOOR * abs(float(self.loss0)))
        if small.numel():
            own[small] = torch.from_numpy(_beyond(own[small].numpy(), _array(wide).T[None]))
        # A probe that saw nothing finite or nothing move, or an element of size 0 (no ulps to
        # move by): every input's.
        seen = torch.isfinite(own) & (size != 0) & ~(values == self.loss0.to(torch.float64)).all(dim=1)
        return torch.where(seen, own, torch.full_like(own, sigma))

    def random_direction(self, name: str, gen: torch.Generator) -> torch.Tensor:
        """d = v∘h: random signs v, the elementwise steps h."""
        shape = self.targets[name].shape
        signs = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
        return signs * steps_for(self.scales[name].reshape(shape).to(torch.float64))

    def along(self, name: str, vectors: Sequence[torch.Tensor], steps: Sequence[float] = DIRECTION_STEPS) -> list[Direction]:
        """The loss's derivative along each vector (in the units of the vector), by two rounds
        of Richardson extrapolation over three steps (error O(h⁶); the error bar as for an
        element, `_estimates`), at the step multiplier of `steps` (1, ⅛)
        whose error bar is smallest off a kink. One direction costs 6 forward passes a step
        multiplier: cheap next to the precision it buys, which is what a single wrong element
        among millions needs."""
        one = Flat({name: self.targets[name]})
        base = one.join(self.targets)

        everyone = list(range(len(vectors)))
        theta = one.join(self.scales).abs()
        validate = torch.tensor(
            [bool((theta[v.reshape(-1) != 0] > VALIDATE_FROM).any()) for v in vectors], dtype=torch.bool
        )

        def at(multipliers: Sequence[float], chosen: list[int]) -> list[dict[str, torch.Tensor]]:
            # Along s ↦ loss(base + s·v) at s = ±m, ±m/2, ±m/4: the derivative in units of v;
            # every multiplier's rows in the same batches, each estimated as if alone.
            f = _along(self.batched, self.targets, one, base, [vectors[i].reshape(-1) * m for m in multipliers for i in chosen])
            found = []
            for b, multiplier in enumerate(multipliers):
                block = f[:, b * len(chosen) : (b + 1) * len(chosen)]
                estimate = _line_estimates(block, multiplier, float(self.loss0), noise=self.noise[0])
                estimate["step"] = torch.full((len(chosen),), multiplier, dtype=torch.float64)
                found.append(estimate)
            return found

        def again(where: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
            # Every direction at its own multiplier, in one batch.
            scaled = [vectors[i].reshape(-1) * m for i, m in zip(where.tolist(), h.tolist())]
            f = _along(self.batched, self.targets, one, base, scaled)
            estimate = _line_estimates(f, h.to(torch.float64), float(self.loss0), noise=self.noise[0])
            estimate["step"] = h.to(torch.float64).clone()
            return estimate

        # fn refuses a point a first step away: narrower steps, as `estimate`
        found = _narrowed(lambda factor: at([multiplier * factor for multiplier in steps], everyone))
        best = found[0]
        for other in found[1:]:
            best = _better(best, other)
        # A multiplier m moves element i by m·h_i, h_i ≈ RELATIVE_STEP·max(1, |θ_i|): per
        # direction, the multipliers that move its largest element by the kink step and by
        # CONFIRM_STEP (a step set by θ's size), a staircase confirmed down to the former (`settle`).
        largest = torch.tensor([float(theta[v.reshape(-1) != 0].max()) if bool((v != 0).any()) else 0.0 for v in vectors], dtype=torch.float64)
        small = _kink_multipliers(largest)
        stairs = self.stairs & (best["value"].abs() > 16 * best["rounding"])
        confirm = _confirmed_at(validate, _confirm_multipliers(largest), stairs, small)
        # A direction not finite a first step away (past a domain's edge) is taken at smaller steps.
        best = settle(best, again, torch.full((len(vectors),), 2.0**-40), validate | ~torch.isfinite(best["value"]), small, confirm)
        return [
            Direction(
                v,
                float(best["value"][i]),
                float(best["error"][i]),
                bool(best["kink"][i]),
                float(best["left"][i]),
                float(best["right"][i]),
                float(best["step"][i]),
            )
            for i, v in enumerate(vectors)
        ]


LINE_OFFSETS = OFFSETS


@dataclass(frozen=True)
class Estimate:
    """Derivatives by finite differences, one per output element: `value` ± `error` (a bar that
    bounds the true error), and on a kink the one-sided derivatives `left` and `right`."""

    value: torch.Tensor
    error: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    kink: torch.Tensor


def along(
    fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    point: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
) -> Estimate:
    """`along_many` of one direction."""
    return along_many(fn, point, [direction])[0]


def along_many(
    fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    point: Mapping[str, torch.Tensor],
    directions: Sequence[Mapping[str, torch.Tensor]],
    parts: Sequence[int] = (),
) -> list[Estimate]:
    """Per direction d, d/ds fn(point + s·d) at s = 0 for every element of fn's (flattened)
    output: the referee's directional derivatives, with the step chosen as reverse mode
    chooses it.

    The output's own rounding is measured per element, once (`_noise_rows`' lines through
    the point); each direction's estimate is taken at the step multipliers DIRECTION_STEPS (its
    elements moved by m·d) and the one with the smallest bar off a kink kept, then settled
    (`settle`): smaller steps where the function's features are finer than the step, where the
    bar is mostly truncation, or where an element of the direction is larger than VALIDATE_FROM.
    Every direction's rows go into the same batches (`Batched`: vmap where it batches fn, one
    call at a time where it does not), and each settling round evaluates only the directions
    and steps it asks for; a column (one output element along one direction) is settled as if
    its direction were alone.

    `parts`: the sizes of the tensors fn's output is the concatenation of (one tensor without
    them). An element's rounding is at least that of its tensor's largest element: a function
    computed as 1 + erf(x) (ndtr) rounds at eps, not at eps·|ndtr(x)|, where ndtr(x) ≈ 3e-8."""
    names = [name for name in point if any(name in d for d in directions)]
    flat = Flat({name: point[name] for name in names})
    base = flat.join(point)
    vectors = torch.stack([flat.join({**{n: torch.zeros_like(point[n]) for n in names}, **d}) for d in directions])
    batched = Batched(fn)

    def outputs(rows: torch.Tensor) -> torch.Tensor:
        """fn at every row, in batches of at most MAX_BATCH rows and MAX_BATCH_ELEMENTS inputs or outputs."""
        chunk = max(1, min(MAX_BATCH, MAX_BATCH_ELEMENTS // max(1, flat.size, f0.numel())))
        return torch.cat([
            batched(point, flat, rows[start : start + chunk]).reshape(len(rows[start : start + chunk]), -1).to(torch.float64)
            for start in range(0, len(rows), chunk)
        ])

    batched.at_point = batched.one(point, flat, base)  # vmap's row at the point is checked against it
    f0 = batched.at_point.reshape(-1).to(torch.float64)
    n, k = f0.numel(), len(directions)
    if not n:  # every output empty (a (0, 5) @ (5, 10) product): no derivative to estimate
        empty = torch.zeros(0, dtype=torch.float64)
        return [Estimate(empty, empty, empty, empty, torch.zeros(0, dtype=torch.bool)) for _ in directions]
    offsets = torch.tensor(OFFSETS, dtype=torch.float64).reshape(1, -1, 1)

    def rows_for(pairs: list[tuple[int, float]]) -> torch.Tensor:
        """The rows base + t·m·d_j, t in OFFSETS, for each (j, m) in `pairs`."""
        which = torch.tensor([j for j, _ in pairs])
        m = torch.tensor([m for _, m in pairs], dtype=torch.float64).reshape(-1, 1, 1)
        return (base + offsets * m * vectors[which][:, None, :]).reshape(-1, flat.size)

    def estimated(pairs: list[tuple[int, float]], values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The estimates of every output along direction j at multiplier m, for each (j, m) in
        `pairs`, from the outputs at `rows_for(pairs)`: len(pairs) blocks of n columns."""
        f = values.reshape(len(pairs), len(OFFSETS), n).permute(1, 0, 2).reshape(len(OFFSETS), -1)
        h = torch.tensor([m for _, m in pairs], dtype=torch.float64).repeat_interleave(n)
        # The moved elements round at every use inside fn, as in reverse mode (`_estimates`'s
        # theta, in the direction's units: θᵢ/dᵢ): along a direction, the largest stands for all.
        theta = units[[j for j, _ in pairs]].repeat_interleave(n)
        estimate = _estimates(f, h, f0.repeat(len(pairs)), theta, noise.repeat(len(pairs)), groups=len(pairs))
        estimate["step"] = h
        return estimate

    largest = torch.where(vectors != 0, base.abs(), 0.0).amax(dim=1)  # per direction, its largest |θ| moved
    units = torch.where(vectors != 0, base.abs() / vectors.abs(), 0.0).amax(dim=1)  # and its largest |θᵢ/dᵢ|
    # The noise lines and every direction at every multiplier, in one batch; for a small check,
    # the first settling round of the directions whose step is set by their size too (`ahead`).
    first = [(j, m) for m in DIRECTION_STEPS for j in range(k)]
    size = torch.where(torch.isfinite(base), base.abs(), 0.0)  # a held -inf does not move
    probe = _noise_rows(base, size)
    if probe is None:  # nothing can move (every input 0): no lines, the floor alone
        probe = base.new_zeros((0, flat.size))

    def ahead(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """What the first settling round asks of the directions whose largest element is over
        VALIDATE_FROM where the first multiplier wins, as it mostly does (`settle`: SHRINK times
        it); only where those rows are few and fit the first batch (a small check, where a
        batched call's own cost is most of the work). A column the other multiplier won is
        evaluated in the round, as before."""
        sized = [(j, m * SHRINK) for j, m in pairs[:k] if float(largest[j]) > VALIDATE_FROM]
        rows = (len(probe) + (len(pairs) + len(sized)) * len(OFFSETS))
        return sized if rows <= MAX_BATCH and rows * max(flat.size, n) <= AHEAD_ELEMENTS else []

    def attempt(factor: float) -> tuple[list[tuple[int, float]], list[tuple[int, float]], torch.Tensor]:
        pairs = [(j, m * factor) for j, m in first]
        later = ahead(pairs)
        return pairs, later, outputs(torch.cat([probe, rows_for(pairs), *([rows_for(later)] if later else [])]))

    # fn refuses a point a first step away (a Cholesky factor of a matrix ≈ 1e3 ± 5 moved by
    # 16): narrower first steps, as in reverse mode (`estimate`), settled from there
    first, later, values = _narrowed(attempt)
    known = dict(zip(later, values[len(probe) + len(first) * len(OFFSETS) :].reshape(len(later), len(OFFSETS), n)))
    values = values[: len(probe) + len(first) * len(OFFSETS)]
    sizes = list(parts) or [n]
    largest_of = [float(part.abs().nan_to_num(0.0, posinf=0.0).max()) if part.numel() else 0.0 for part in f0.split(sizes)]
    floor = ROUNDING_FLOOR * torch.tensor(largest_of, dtype=torch.float64).repeat_interleave(torch.tensor(sizes))
    noise, jumps = _output_noise_of(values[: len(probe)], f0, floor)
    seen = values[: min(len(probe), NOISE_ROWS)]  # the lines at each element's own scale
    if bool(jumps.any()) and len(names) > 1:
        # An output that jumps at the point when some input moves (a ±1 label that requires
        # grad: off ±1 the loss takes another branch) shows no rounding, and as σ the jump would
        # widen every bar until any jvp passed. As in reverse mode (`_measured`), the tensors
        # that make it jump are left out of the probe; where every tensor does, the jump is all
        # there is to measure.
        def probed(kept: set[str]) -> torch.Tensor:
            scale = torch.cat([size[flat.slices[name]] * (name in kept) for name in names])
            rows = _noise_rows(base, scale)
            return f0.new_zeros((0, n)) if rows is None else outputs(rows)

        smooth = {name for name in names if not bool(_output_noise_of(probed({name}), f0, floor)[1].any())}
        if smooth:
            seen = probed(smooth)
            noise, jumps = _output_noise_of(seen, f0, floor)
            seen = seen[:NOISE_ROWS]
    # An output element that did not move at all on the noise lines: a staircase whose stairs
    # may be finer than the step (round(x, 3)), as reverse mode's `still`: a slope seen at the
    # step is checked at smaller ones. One that jumps at the point: still beside it, along each line.
    still = (seen == f0).all(dim=0) if len(seen) else torch.zeros(n, dtype=torch.bool)
    if len(seen) and bool(jumps.any()):
        still = torch.where(jumps, still_beside(seen), still)
    # Such an element shows no rounding to measure; the floor is a perfect rounding's, and a
    # function's own error is up to an ulp of its value (atan at 1e6: π/2 − 1/x, whose bars at
    # small steps, from the floor, were half their true size and settled on chance).
    noise = torch.where(still, torch.maximum(noise, EPS * f0.abs().nan_to_num(0.0, posinf=0.0)), noise)
    if bool((still & (f0 == 0)).any()):  # exactly 0: the rounding of the terms it cancels (`_measured`)
        terms = terms_scale(lambda: batched.one(point, flat, base), base)
        noise = torch.where(still & (f0 == 0), torch.clamp(noise, min=ROUNDING_FLOOR * terms), noise)
    beside = still & (f0 != 0)
    if bool(beside.any()):  # beside it, float64's rounding of every value fn computes (`_measured`)
        moved = _float64_rounding(lambda: batched.one(point, flat, base).reshape(-1).to(torch.float64))
        if moved is not None:
            noise = torch.where(beside, torch.maximum(noise, moved), noise)
    coarse = still.clone()
    if bool(still.any()):  # a staircase of its own, not float32's rounding (STAIR_MOVE)
        rows = _stair_rows(base, size)
        coarse = still & (outputs(rows) == f0).any(dim=0) if rows is not None else torch.zeros_like(still)
    still, coarse = still.repeat(k), coarse.repeat(k)
    stage = estimated(first, values[len(probe) :])
    best = {key: value[: k * n] for key, value in stage.items()}
    for b in range(1, len(DIRECTION_STEPS)):
        best = _better(best, {key: value[b * k * n : (b + 1) * k * n] for key, value in stage.items()})
    sloped = best["value"].abs() > 16 * best["rounding"]
    best["flat"] = best["flat"] | (still & sloped)
    stairs = coarse & sloped
    validate = (largest > VALIDATE_FROM).repeat_interleave(n) | best["flat"]

    def again(where: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        asked = [(c // n, c % n, m) for c, m in zip(where.tolist(), h.tolist())]
        pairs = sorted({(j, m) for j, _, m in asked})
        block = {pair: b for b, pair in enumerate(pairs)}
        missing = [pair for pair in pairs if pair not in known]
        if missing:
            known.update(zip(missing, outputs(rows_for(missing)).reshape(len(missing), len(OFFSETS), n)))
        estimate = estimated(pairs, torch.cat([known.pop(pair) for pair in pairs]))
        take = torch.tensor([block[(j, m)] * n + c for j, c, m in asked], dtype=torch.int64)
        return {key: value[take] for key, value in estimate.items()}

    # A multiplier m moves element i by m·h_i, h_i ≈ RELATIVE_STEP·max(1, |θ_i|).
    small = _kink_multipliers(largest).repeat_interleave(n)
    sized = (largest > VALIDATE_FROM).repeat_interleave(n)
    confirm = _confirmed_at(sized, _confirm_multipliers(largest).repeat_interleave(n), stairs, small)
    best = settle(best, again, torch.full((k * n,), 2.0**-40, dtype=torch.float64), validate, small, confirm)
    return [Estimate(*(best[key][j * n : (j + 1) * n] for key in ("value", "error", "left", "right", "kink"))) for j in range(k)]


def _kink_multipliers(largest: torch.Tensor) -> torch.Tensor:
    """The step multipliers along directions (element i moved by m·RELATIVE_STEP·max(1, |θ_i|))
    whose largest elements are `largest`, at which a kink is confirmed: the largest element
    moved no more than an element's own confirming step (KINK_STEP, or 2¹⁶ ulps of it)."""
    confirming = (_step_floor(largest) * (KINK_ULPS / STEP_FLOOR_ULPS)).clamp(min=KINK_STEP)
    return confirming / (RELATIVE_STEP * largest.abs().clamp(min=1.0))


def _confirmed_at(sized: torch.Tensor, confirming: torch.Tensor, stairs: torch.Tensor | None, small: torch.Tensor) -> torch.Tensor:
    """`settle`'s confirm, per column: a step set by θ's size (`sized`) is confirmed at
    `confirming` (CONFIRM_STEP, in the column's units), a staircase of its own down to `small`
    (the kink step); elsewhere any step settles."""
    confirm = torch.where(sized, confirming, math.inf)
    return confirm if stairs is None else torch.where(stairs, torch.minimum(confirm, small), confirm)


def _confirm_multipliers(largest: torch.Tensor) -> torch.Tensor:
    """The step multipliers that move the largest elements `largest` by CONFIRM_STEP."""
    return CONFIRM_STEP / (RELATIVE_STEP * largest.abs().clamp(min=1.0))


def _output_noise_of(values: torch.Tensor, f0: torch.Tensor, floor: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output element, the σ of its rounding (`_measured_noise`, for a vector output; never
    below `floor`), from the outputs at `_noise_rows` (no rows: the floor) and at the point, and
    whether it jumps at the point (`_noise_of`'s jumps: the difference through the point
    JUMP_RATIO times those beside it)."""
    least = torch.maximum(ROUNDING_FLOOR * f0.abs().nan_to_num(0.0, posinf=0.0), torch.as_tensor(floor, dtype=torch.float64))
    if not len(values):
        return least, torch.zeros(f0.shape, dtype=torch.bool)
    values, wide = values[:NOISE_ROWS], values[NOISE_ROWS:]
    squares = torch.from_numpy(_noise_squares(_array(values), _array(f0))).nan_to_num(0.0, posinf=0.0)
    through, beside = squares[:, 0].mean(dim=0), squares[:, 1:].mean(dim=(0, 1))
    jumps = through > JUMP_RATIO**2 * torch.maximum(beside, least.square())
    # An output that jumps at the point (a sum of ceil with a whole-number input) shows its
    # rounding beside it, as in reverse mode (`_noise_of`)
    sigma = torch.maximum(torch.where(jumps, beside, squares.mean(dim=(0, 1))).sqrt(), least)
    if len(wide):  # what the wide lines show beyond (`_beyond`)
        sigma = torch.from_numpy(_beyond(sigma.numpy(), _array(wide).reshape(NOISE_WIDE_COUNT, NOISE_POINTS - 1, -1)))
    return sigma, jumps


def _along(
    batched: Batched, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor, vectors: list[torch.Tensor]
) -> torch.Tensor:
    """The loss at base + t·v for t in LINE_OFFSETS, for each vector: a (6, len(vectors)) matrix."""
    per_chunk = max(1, MAX_BATCH_ELEMENTS // max(1, len(LINE_OFFSETS) * flat.size))
    columns = []
    for start in range(0, len(vectors), per_chunk):
        chunk = vectors[start : start + per_chunk]
        rows = torch.stack([base + t * v for v in chunk for t in LINE_OFFSETS])
        columns.append(batched(targets, flat, rows).reshape(len(chunk), len(LINE_OFFSETS)).T)
    return torch.cat(columns, dim=1)


def _line_estimates(
    f: torch.Tensor,
    h: float | torch.Tensor,
    f0: float | torch.Tensor,
    noise: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The derivative at 0 along a line from the values at ±h, ±h/2, ±h/4 (rows of `f`, in
    LINE_OFFSETS order): the elementwise estimate (`_estimates`), the same stencil."""
    value = f[0]
    return _estimates(f, torch.as_tensor(h, dtype=torch.float64).expand_as(value), f0, noise=noise)


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


PARTS = ("values", "error", "left", "right", "kink")


def _store(
    result: Gradients,
    estimates: dict[str, dict[str, torch.Tensor]],
    targets: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor] | None,
) -> None:
    """Put `estimates` into `result`: whole tensors, or (with `mask`) the flat elements given,
    NaN elsewhere, the estimated ones marked in `result.checked` (dropped once all are)."""
    for name, estimate in estimates.items():
        shape = targets[name].shape
        index = None if mask is None else mask[name]
        for part, key in zip(PARTS, ("value", "error", "left", "right", "kink")):
            store: dict[str, torch.Tensor] = getattr(result, part)
            if index is None:
                store[name] = estimate[key].reshape(shape)
                continue
            have = store.get(name)
            if have is None:
                kink = key == "kink"
                have = torch.full(shape, False if kink else math.nan, dtype=torch.bool if kink else torch.float64)
            flat = have.reshape(-1).clone()
            flat[index] = estimate[key]
            store[name] = flat.reshape(shape)
        if index is None:
            result.checked.pop(name, None)
            continue
        checked = result.checked.get(name)
        flat = torch.zeros(shape.numel(), dtype=torch.bool) if checked is None else checked.reshape(-1).clone()
        flat[index] = True
        if bool(flat.all()):
            result.checked.pop(name, None)
            result.directions.pop(name, None)
        else:
            result.checked[name] = flat.reshape(shape)


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
        if not self.shapes:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([tensors[name].reshape(-1).to(torch.float64) for name in self.shapes])

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor in its own storage, not a view into `vector`: an op that reads storage
        through explicit strides and offsets (`as_strided`) must see the tensor's values only,
        as it does in the user's call, not its neighbours' in the flat vector."""
        return {name: vector[part].reshape(self.shapes[name]).clone() for name, part in self.slices.items()}

    def columns(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """`split` of every row of `batch` at once, for vmap: each tensor's columns as (rows,
        *shape), in storage of its own from offset 0 (vmap reads a row's strides and offsets
        from the row's start, so each row sees its own values only, as `split` gives them).
        A contiguous batch of one tensor is that already, and is not copied; under vmap, a
        copy per row costs 3-4 times the forward of an MLP's samples."""
        rows = batch.shape[0]
        if len(self.slices) == 1 and batch.is_contiguous() and batch.storage_offset() == 0:
            (name,) = self.shapes
            return {name: batch.reshape(rows, *self.shapes[name])}
        return {
            name: batch[:, part].clone(memory_format=torch.contiguous_format).reshape(rows, *self.shapes[name])
            for name, part in self.slices.items()
        }


def _step_floor(theta: torch.Tensor) -> torch.Tensor:
    """The smallest step a shrinking search goes down to: FLOOR_ULPS ulps of θ (θ ± h stays
    exact and the difference keeps ~8 bits of its own), and never below 2⁻⁶⁰."""
    theta = theta.to(torch.float64).abs()
    ulp = torch.nextafter(theta, torch.full_like(theta, math.inf)) - theta
    return torch.clamp(ulp * STEP_FLOOR_ULPS, min=2.0**-60)


def steps_for(scale: torch.Tensor) -> torch.Tensor:
    """A power of two near RELATIVE_STEP·max(1, |θ|) for each element: θ ± h is exact."""
    target = RELATIVE_STEP * scale.abs().clamp(min=1.0)
    return torch.exp2(torch.round(torch.log2(target)))


def _ahead(scale: torch.Tensor, chosen: torch.Tensor, hs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the first settling round asks for whatever the estimates say: the elements whose
    step is set by their size (|θ| > VALIDATE_FROM, always checked at a smaller step), at
    SHRINK times their one step (`settle`). Evaluated with the first steps, in the same batch."""
    if len(hs) != 1:
        return None
    sized = chosen[scale[chosen].abs() > VALIDATE_FROM]
    return (sized, hs[0][sized] * SHRINK) if sized.numel() else None


Narrowed = TypeVar("Narrowed")


def _narrowed(attempt: Callable[[float], Narrowed]) -> Narrowed:
    """`attempt(1.0)`, the first steps as chosen; where fn refuses a point a step away (a
    CaseError), `attempt` at NARROWER times that, up to NARROWINGS times (a Cholesky factor of a
    matrix ≈ 1e6 + O(1): steps of 2¹⁴ and 2⁷ leave it indefinite, 2⁻⁷ does not). The last
    refusal is fn's own error."""
    factor = 1.0
    for _ in range(NARROWINGS):
        try:
            return attempt(factor)
        except CaseTimeout:
            raise
        except CaseError:
            factor *= NARROWER
    return attempt(factor)


def evaluate(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    h: torch.Tensor,
    index: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """The loss at θ + t·h, t in OFFSETS, for each element in `index` of the flat vector, as a
    (6, size) matrix (NaN for elements not in `index`).

    From REPLAY_FROM elements on, the recorded forward is replayed (`_replayed`); otherwise, or
    where it cannot be, the forward runs under vmap: the perturbed rows live in one buffer of at
    most CHUNK_BYTES, filled with θ once: from one chunk to the next only the 4 entries a row
    perturbs are put back and set anew, so building rows costs O(1) per evaluation, not
    O(size), and memory stays bounded at any size."""
    index = torch.as_tensor(index, dtype=torch.int64)
    if isinstance(batched, InPlace):  # a numpy forward (inplace.py)
        return batched.elements(flat, h, index, OFFSETS)
    base = flat.join(targets)
    f = torch.full((len(OFFSETS), flat.size), torch.nan, dtype=torch.float64)
    program = _program(batched, targets, flat, base, len(index))
    if program is not None:
        try:
            f[:, index] = _replayed(batched, program, targets, flat, base, h, index)
            return f
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - Unreplayable, or an op the replay cannot batch: vmap of it all
            batched.programs[tuple(flat.shapes)] = None
    f[:, index] = _vmapped(batched, targets, flat, base, index, h[index])[0]
    return f


def evaluate_steps(
    batched: Batched | InPlace,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    hs: Sequence[torch.Tensor],
    index: Sequence[int] | torch.Tensor,
    extra: torch.Tensor | None = None,
    ahead: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None, Known | None]:
    """`evaluate` at each of the step vectors `hs`: under vmap, the rows of every step go into
    the same batches (one batched call where `evaluate` per step would make one each), and so
    do the flat vectors `extra` (the noise probe's), whose losses come second (None where they
    were not evaluated: the replay and a numpy forward evaluate step by step), and the elements
    and steps `ahead` that settling is known to ask for next (`Known`; None where not evaluated)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    base = flat.join(targets)
    if isinstance(batched, InPlace) or _program(batched, targets, flat, base, len(index)) is not None:
        return [evaluate(batched, targets, flat, h, index) for h in hs], None, None
    elements, steps = index.repeat(len(hs)), torch.cat([h[index] for h in hs])
    if ahead is not None:
        elements, steps = torch.cat([elements, ahead[0]]), torch.cat([steps, ahead[1]])
    values, probed = _vmapped(batched, targets, flat, base, elements, steps, extra)
    found = []
    for k in range(len(hs)):
        f = torch.full((len(OFFSETS), flat.size), torch.nan, dtype=torch.float64)
        f[:, index] = values[:, k * len(index) : (k + 1) * len(index)]
        found.append(f)
    known = None if ahead is None else Known(ahead[0], ahead[1], values[:, len(hs) * len(index) :])
    return found, probed, known


@dataclass
class Known:
    """The loss at θ + t·h (t in OFFSETS) for some flat elements at their steps, evaluated ahead
    in a batch that ran anyway (`evaluate_steps`): a settling round that asks for them reads
    them here, one batched call fewer (`rows`)."""

    elements: torch.Tensor
    steps: torch.Tensor
    values: torch.Tensor  # (len(OFFSETS), len(elements))

    def rows(
        self, evaluate_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], elements: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        """The (6, len(elements)) values at `elements` and steps `h`: those known from here, the
        others by `evaluate_at(elements, h)` (one call, for them alone)."""
        where = {(e, s): k for k, (e, s) in enumerate(zip(self.elements.tolist(), self.steps.tolist()))}
        found = [where.get(pair, -1) for pair in zip(elements.tolist(), h.tolist())]
        if min(found, default=0) >= 0:  # all known (the usual case: `_ahead` foresaw the round)
            return self.values[:, torch.tensor(found, dtype=torch.int64)]
        hit = torch.tensor([k >= 0 for k in found], dtype=torch.bool)
        out = torch.empty((len(OFFSETS), len(elements)), dtype=torch.float64)
        if bool(hit.any()):
            out[:, hit] = self.values[:, torch.tensor([k for k in found if k >= 0], dtype=torch.int64)]
        if not bool(hit.all()):
            out[:, ~hit] = evaluate_at(elements[~hit], h[~hit])
        return out


def _program(batched: Batched, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor, count: int) -> Program | None:
    """The recorded forward to replay `count` elements of `flat` with, or None (vmap): a group
    already recorded is replayed for a few elements too (the steps chosen again); another from
    REPLAY_FROM elements on, unless the check is tiny."""
    if getattr(batched, "programs", {}).get(tuple(flat.shapes)) is not None:
        return batched.program(targets, flat, base)
    # vmap cannot batch the forward (a custom Function without a vmap rule): each perturbation
    # would cost a forward pass of its own, where the replay of its ops costs a fraction of one
    if not batched.vmap_works and count >= UNBATCHED_REPLAY_FROM and batched.recording_pays(targets, flat, base, count):
        return batched.program(targets, flat, base)
    if count >= REPLAY_FROM and not batched.tiny(targets, flat, base):
        return batched.program(targets, flat, base)
    return None


def _vmapped(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    base: torch.Tensor,
    elements: torch.Tensor,
    h: torch.Tensor,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss at θ + t·h, t in OFFSETS, for each flat element `elements[i]` at its step `h[i]`
    (an element may come more than once, at other steps), as a (6, len(elements)) matrix, by
    the forward under vmap: the perturbed rows live in one buffer of at most CHUNK_BYTES, filled
    with θ once; from one chunk to the next only the entries the rows perturb are put back and
    set anew, so building rows costs O(1) per evaluation, not O(size). The flat vectors `extra`
    ride along in the first chunk; their losses come second (None without elements)."""
    out = torch.empty((len(OFFSETS), len(elements)), dtype=torch.float64)
    per_chunk = elements_per_chunk(flat.size)
    count = min(per_chunk, len(elements)) * len(OFFSETS)
    if count == 0:
        return out, None
    rows = base.repeat(count, 1)
    line = torch.arange(count)
    offsets = torch.tensor(OFFSETS, dtype=torch.float64).repeat(count // len(OFFSETS))
    previous: torch.Tensor | None = None
    probed = None
    for start in range(0, len(elements), per_chunk):
        idx = elements[start : start + per_chunk]
        n = len(idx) * len(OFFSETS)
        which = idx.repeat_interleave(len(OFFSETS))
        if previous is not None:
            rows[line[: previous.numel()], previous] = base[previous]
        # θ + t·h, exact (h a power of two): the same value as adding the offset to a copy of θ
        rows[line[:n], which] = base[which] + offsets[:n] * h[start : start + per_chunk].repeat_interleave(len(OFFSETS))
        if extra is not None and probed is None:
            values = batched(targets, flat, torch.cat([rows[:n], extra]))
            values, probed = values[:n], values[n:]
        else:
            values = batched(targets, flat, rows[:n])
        out[:, start : start + len(idx)] = values.reshape(len(idx), len(OFFSETS)).T
        previous = which
    return out, probed


def _replayed(
    batched: Batched,
    program: Program,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    base: torch.Tensor,
    h: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """`evaluate` by replaying the recorded forward (replay.py): the loss at θ ± h and
    θ ± h/2, θ ± h/4 for each element in `index`, as a (6, len(index)) matrix. Each tensor's first
    element is replayed alone, to learn how wide its states are, and the rest in chunks that
    hold them within the replay's memory bound. Two rows of every chunk are checked against a
    plain forward pass. Unreplayable where one differs, or where the chunks would hold fewer
    than MIN_REPLAY_ROWS perturbations."""
    which = index.repeat_interleave(len(OFFSETS))
    new = base[which] + torch.tensor(OFFSETS, dtype=torch.float64).repeat(len(index)) * h[which]
    starts = torch.tensor([part.start for part in flat.slices.values()])
    leaf_of = torch.searchsorted(starts, which, right=True) - 1
    out = torch.empty(which.numel(), dtype=torch.float64)
    vector = base.clone()  # the checked rows: one element set, then put back
    for leaf in leaf_of.unique().tolist():
        chosen = (leaf_of == leaf).nonzero().reshape(-1)
        start = 0
        while start < chosen.numel():
            if start and program.rows() < MIN_REPLAY_ROWS:
                raise Unreplayable(f"its values are too large to replay {MIN_REPLAY_ROWS} perturbations at once")
            part = chosen[start : start + (program.rows() if start else len(OFFSETS))]
            values = program(leaf, which[part] - starts[leaf], new[part])
            for row in {0, part.numel() // 2}:
                element = which[part[row]]
                vector[element] = new[part[row]]
                plain = batched.one(targets, flat, vector)
                vector[element] = base[element]
                if not _same(values[row], plain):
                    raise Unreplayable(f"the replay gives {float(values[row])!r}, the forward {float(plain)!r}")
            out[part] = values
            start += part.numel()
    return out.reshape(len(index), len(OFFSETS)).T


def elements_per_chunk(size: int) -> int:
    """How many elements one batch perturbs (6 rows each): as many as fit in CHUNK_BYTES of
    rows, at least one, at most MAX_BATCH rows."""
    return max(1, min(MAX_BATCH, CHUNK_BYTES // (8 * max(1, size))) // len(OFFSETS))


class _Probes:
    """The loss at each row of a batch of rounding probes: under vmap where it gives what a plain
    forward pass gives at the first row, else by plain forward passes one at a time."""

    def __init__(self, loss: Loss, vmap: bool) -> None:
        self.loss = loss
        self.vmap = vmap
        self.at_point: torch.Tensor | None = None  # as `Batched.at_point`

    def __call__(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.vmap:
                try:
                    values = _checked_under_vmap(self.loss, targets, flat, batch, self.at_point)
                    if values is not None:
                        return values.reshape(-1)
                except CaseTimeout:
                    raise
                except Exception:  # noqa: BLE001 - an op vmap cannot batch: one at a time, from now on
                    self.vmap = False
            return _one_by_one(self.loss, targets, flat, batch).reshape(-1)


def _measured_noise(
    batched: Batched | InPlace | _Probes,
    moved: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    scale: torch.Tensor,
    f0: float,
) -> tuple[float, bool, bool]:
    """The standard deviation σ of the forward's own rounding when the tensors `moved` move,
    whether the loss stood still (bitwise) meanwhile, and whether it jumps at the point itself
    (the differences through the point JUMP_RATIO times those beside it: the loss a few ulps
    away is smooth, the point is off it). Measured as Moré and Wild's ECnoise does:
    the loss along NOISE_LINES random lines through the point, at NOISE_POINTS points NOISE_ULPS
    ulps of each element (`scale`: its size) apart (`_noise_rows`). Over so small a spacing the
    function is a polynomial to far below rounding, so its NOISE_ORDER-th differences are
    rounding alone, with variance C(2k, k)·σ² (`_noise_of`). It sees what |loss|·eps cannot (an
    input offset by 1e5 and normalised, a timestamp inside a sine: the forward rounds x − mean
    or t/86400 at the scale of x or t). Never below ROUNDING_FLOOR·|loss| (the rounding of the
    loss itself); that floor where the probes cannot run (the plain forward says why)."""
    flat = Flat(dict(moved))
    floor = _noise_floor(f0)
    rows = _noise_rows(flat.join(moved), scale)
    if rows is None:
        return floor, False, False
    try:
        with torch.no_grad():
            values = batched(targets, flat, rows)
    except CaseTimeout:
        raise
    except Exception:  # noqa: BLE001 - the forward's own error is reported by the plain pass
        return floor, False, False
    return _noise_of(values, f0, floor)


def _stair_rows(base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The point moved by ±1 and ±2 times STAIR_MOVE of each element's `scale`, along a random
    sign each (`_coarse`); None where nothing can move."""
    size = scale.reshape(-1).to(torch.float64).abs()
    if not size.numel() or not bool((size > 0).any()):
        return None
    gen = torch.Generator().manual_seed(NOISE_SEED)
    signs = torch.randint(0, 2, (size.numel(),), generator=gen, dtype=torch.float64) * 2 - 1
    return torch.stack([base + k * STAIR_MOVE * signs * size for k in (1.0, -1.0, 2.0, -2.0)])


def _noise_floor(f0: float) -> float:
    """The least σ `_measured_noise` gives: the rounding of the loss `f0` itself."""
    return ROUNDING_FLOOR * abs(f0) if math.isfinite(f0) else 0.0


def _noise_rows(base: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The flat vectors `_measured_noise` evaluates the loss at, line after line: the point
    `base` moved by 1…NOISE_POINTS − 1 times NOISE_ULPS ulps of each element's `scale`, along
    NOISE_LINES random signs (the first NOISE_ROWS rows); then, where an element is smaller than
    NOISE_WIDE_SCALE, NOISE_WIDE_COUNT wide lines (`_beyond`). None where nothing can move (no
    element, or all of size 0)."""
    size = scale.reshape(-1).to(torch.float64).abs()
    if not size.numel() or not bool((size > 0).any()):
        return None
    signs = _noise_signs(size.numel()).reshape(NOISE_LINES, 1, -1)
    rows = (base + _NOISE_STEPS * (signs * size)).reshape(-1, size.numel())
    small = (size > 0) & (size < NOISE_WIDE_SCALE)
    if not bool(small.any()):
        return rows
    # The wide lines: the first NOISE_WIDE_COUNT signs, every small element NOISE_WIDE_ULPS
    # ulps of 1 a step, the others as above (NOISE_ULPS·NOISE_WIDE_SCALE is NOISE_WIDE_ULPS).
    wide = base + _NOISE_STEPS * (signs[:NOISE_WIDE_COUNT] * torch.where(small, NOISE_WIDE_SCALE, size))
    return torch.cat([rows, wide.reshape(-1, size.numel())])


# The noise lines' spacing: 1…NOISE_POINTS − 1 times NOISE_ULPS ulps, one row each.
_NOISE_STEPS = torch.arange(1, NOISE_POINTS, dtype=torch.float64).reshape(-1, 1) * (NOISE_ULPS * EPS)
NOISE_ROWS = NOISE_LINES * (NOISE_POINTS - 1)  # the rows of the lines at each element's own scale
# Up to this many elements the noise lines' signs are drawn once per size (`_noise_signs`),
# for the last KEPT_SIZES sizes: at most 16 MB kept.
KEPT_SIGNS = 1 << 12
KEPT_SIZES = 128


def _noise_signs(size: int) -> torch.Tensor:
    """The random signs of the NOISE_LINES noise lines over `size` elements, (lines, size): the
    same for every call (seeded), drawn once per size up to KEPT_SIGNS elements."""
    return _kept_signs(size) if size <= KEPT_SIGNS else _drawn_signs(size)


def _drawn_signs(size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(NOISE_SEED)
    return torch.stack([torch.randint(0, 2, (size,), generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(NOISE_LINES)])


_kept_signs = functools.lru_cache(maxsize=KEPT_SIZES)(_drawn_signs)


class _Terms(TorchDispatchMode):
    """Records the largest finite magnitude of every floating-point value an op makes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if readable_values(value):
                self.largest = max(self.largest, float(_finite_abs(value).max()))
        return out


def stochastic(
    compute: Callable[[], dict[str, torch.Tensor]], names: list[str], unit: float, seed: int
) -> dict[str, torch.Tensor]:
    """Per name in `names`, how far the float64 values `compute()` gives for it move when every
    floating-point value an op makes is multiplied by 1 + δ, δ uniform within ±`unit` (Monte
    Carlo arithmetic: a dtype's rounding, simulated in float64). STOCHASTIC_PAIRS draws,
    each applied both ways: a computation that merely rounds responds to them linearly, the two
    moves opposite; an element whose moves are not opposite in every pair jumps (a branch, a tie
    that the draws break) and gets 0, as a jump is no rounding. {} where `compute` fails under
    the draws (nothing is allowed then)."""
    try:
        base = compute()
    except CaseTimeout:
        raise
    except Exception:  # noqa: BLE001 - as under the draws below
        return {}
    if any(base.get(name) is None for name in names):
        return {}
    flat = {name: base[name].detach().to("cpu", torch.float64) for name in names}
    spread = {name: torch.zeros_like(value) for name, value in flat.items()}
    smooth = {name: torch.ones_like(value, dtype=torch.bool) for name, value in flat.items()}
    for pair in range(STOCHASTIC_PAIRS):
        moved = []
        for sign in (1.0, -1.0):
            try:
                with _Rounds(unit * sign, seed + pair):
                    moved.append(compute())
            except CaseTimeout:
                raise
            except Exception:  # noqa: BLE001 - fn that refuses the perturbed values: no allowance
                return {}
        for name, g in flat.items():
            up, down = (m.get(name) for m in moved)
            if up is None or down is None or up.shape != g.shape or down.shape != g.shape:
                return {}
            up, down = up.detach().to("cpu", torch.float64), down.detach().to("cpu", torch.float64)
            odd = ((up - down).abs() / 2).nan_to_num(nan=0.0, posinf=0.0)
            even = (up + down - 2 * g).abs()
            smooth[name] &= even <= odd / 2 + 64 * EPS * g.abs()
            spread[name] = torch.maximum(spread[name], odd)
    return {name: torch.where(smooth[name], s, torch.zeros_like(s)) for name, s in spread.items()}


class _Rounds(TorchDispatchMode):
    """Every floating-point value an op computes (not a view of another, nor written in place)
    multiplied by 1 + δ, δ uniform within ±`unit`, drawn from a generator seeded with `seed`: the
    same draws in the same order for -`unit`, so two runs move the values opposite ways."""

    def __init__(self, unit: float, seed: int) -> None:
        super().__init__()
        self.unit = unit
        self.gen = torch.Generator().manual_seed(seed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        if func.is_view or any(r.alias_info is not None for r in func._schema.returns):
            return out
        return tree_map(self._rounded, out)

    def _rounded(self, value: object) -> object:
        if not readable_values(value):  # an integer, an empty tensor, a ZeroTensor's exact zeros
            return value
        assert isinstance(value, torch.Tensor)
        real = value.real.dtype if value.is_complex() else value.dtype
        delta = (torch.rand(value.shape, generator=self.gen, dtype=torch.float64) * 2 - 1) * self.unit
        return value * (1 + delta).to(value.device, real)


def _float64_rounding(compute: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """Per value `compute()` gives, how far float64's rounding of every value it computes moves
    it (`stochastic`; 0 where it jumps; None where `compute` fails). Simulated at
    STOCHASTIC_MAGNIFY times the unit roundoff and scaled back: at the unit itself each simulated
    move is rounded again, to zero or a whole ulp, and a value near 1 seems to jump."""
    moved = stochastic(lambda: {"value": compute()}, ["value"], STOCHASTIC_MAGNIFY * EPS / 2, NOISE_SEED)
    return moved["value"] / STOCHASTIC_MAGNIFY if "value" in moved else None


def readable_values(value: object) -> bool:
    """Whether `value` is a non-empty floating-point or complex tensor whose values a dispatch
    mode may read and replace: strided, and not an efficient ZeroTensor (exact zeros with no
    storage: reading one is a segmentation fault)."""
    return (
        isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()) and bool(value.numel())
        and value.layout == torch.strided and not value._is_zerotensor()
    )


def still_beside(values: torch.Tensor) -> torch.Tensor:
    """Per output (the last dimension), whether the values at `_noise_rows` stand still along
    each noise line: the loss beside a point it jumps at (ceil of a whole-number input)."""
    lines = values.reshape(NOISE_LINES, NOISE_POINTS - 1, -1)
    return (lines == lines[:, :1]).all(dim=1).all(dim=0)


def _finite_abs(value: torch.Tensor) -> torch.Tensor:
    return value.detach().abs().to(torch.float64).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def terms_scale(call: Callable[[], object] | None, *inputs: torch.Tensor) -> float:
    """The largest finite magnitude among `inputs` and the floating-point values `call` computes
    (one plain forward pass under a dispatch mode, as far as it gets; None: the inputs alone).
    Asked only where a value stands still at exactly 0, whose rounding is that of the terms it
    cancels."""
    terms = _Terms()
    if call is not None:
        try:
            with torch.no_grad(), terms:
                call()
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - what the trace cannot follow: the values seen before it
            pass
    return max([terms.largest, *(float(_finite_abs(t).max()) for t in inputs if t.numel())])


def _noise_of(values: torch.Tensor, f0: float, floor: float) -> tuple[float, bool, bool]:
    """σ, still and jumps (`_measured_noise`) from the loss at the rows of `_noise_rows` (in
    numpy: a few operations on a few dozen values): from its lines at each element's scale, σ
    at least what its wide lines show (`_wide_noise`)."""
    values, wide = values[:NOISE_ROWS], values[NOISE_ROWS:]
    still = bool((values == f0).all())
    squares = _noise_squares(_array(values), np.array([f0]))[..., 0]
    # Column 0 is the only difference through the point; the others lie beside it. Rounding
    # makes them alike (a ratio of JUMP_RATIO² in mean square is beyond chance), a jump at the
    # point shows in column 0 alone.
    through, beside = squares[:, 0], squares[:, 1:]
    through, beside = through[np.isfinite(through)], beside[np.isfinite(beside)]
    jumps = bool(through.size and beside.size) and float(through.mean()) > JUMP_RATIO**2 * max(float(beside.mean()), floor**2)
    finite = squares[np.isfinite(squares)]
    if jumps:
        # The point sits on a step of the loss (ceil at an integer element, a ±1 label): the jump
        # is no rounding, and as σ it would widen every bar until any gradient passed. Beside the
        # point the differences are rounding alone, and the loss may stand still there along each
        # line (a staircase, whose slope seen at a wide step is checked at smaller ones).
        finite = beside
        still = bool(still_beside(values).all())
    sigma = max(floor, math.sqrt(float(finite.mean()))) if finite.size else floor
    if len(wide):
        sigma = float(_beyond(np.array([sigma]), _array(wide).reshape(NOISE_WIDE_COUNT, NOISE_POINTS - 1, -1))[0])
    if still:  # no rounding to measure: a function's own error is up to an ulp of its value (`along_many`)
        sigma = max(sigma, EPS * abs(f0) if math.isfinite(f0) else 0.0)
    return sigma, still, jumps


def _beyond(sigma: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """σ from the lines at each element's own scale (per output), or what the wide `lines` show
    (`_wide_noise`) where that is more than NOISE_WIDE_BEYOND times it: rounding the others could
    not reach (exp(x) ≈ 1 at x = 1e-5: 1e-16 where they saw 1e-22), not two estimates of the
    same rounding a sample apart."""
    orders = _differences_of(lines)
    # The σ taken is within NOISE_WIDE_AGREE of the 4th differences' (every triple of orders the
    # test tries holds the 4th): where that is too small to count, the test need not run.
    with np.errstate(all="ignore"):
        fourth = np.sqrt((orders[3] ** 2).mean(axis=(0, 1)) / math.comb(8, 4))
    if not bool((fourth > NOISE_WIDE_BEYOND / NOISE_WIDE_AGREE * sigma).any()):  # also False where NaN
        return sigma
    wide = _wide_noise(orders)
    return np.where(wide > NOISE_WIDE_BEYOND * sigma, wide, sigma)


def _wide_noise(orders: list[np.ndarray]) -> np.ndarray:
    """Per output (the last dimension), the σ of the rounding the wide lines show, from their
    differences of order 1, 2, … (each (lines, points, outputs); the point itself left out of the
    lines, so that a jump at it is not read as rounding), or 0 where they do not look like
    rounding. Moré and Wild's test (ECnoise): the k-th differences of independent rounding have
    variance C(2k, k)·σ² at every order k, so the σ read at three orders in a row agree within
    NOISE_WIDE_AGREE, and they change sign along every line; a smooth function's differences
    fall (or grow) from one order to the next and keep their sign (log x at x = 1e-10, whose
    scale the lines' spacing is not small against). And every line sees the same rounding,
    within NOISE_WIDE_LINES of the others: a kink that some lines cross (a ReLU's input a spacing
    from 0) passes the first test, and is no rounding. σ is read at the lowest order that passes."""
    sigmas, changes = [], []
    with np.errstate(all="ignore"):
        for k, differences in enumerate(orders, 1):
            squares = differences**2 / math.comb(2 * k, k)
            per_line = np.sqrt(squares.mean(axis=1))  # (lines, outputs)
            alike = per_line.max(axis=0) <= NOISE_WIDE_LINES * per_line.min(axis=0)
            sigmas.append(np.sqrt(squares.mean(axis=(0, 1))))
            changes.append(((differences > 0).any(axis=1) & (differences < 0).any(axis=1)).all(axis=0) & alike)
        found = np.zeros(orders[0].shape[-1])
        decided = np.zeros(orders[0].shape[-1], dtype=bool)
        for k in range(1, len(orders) - 2):  # orders 2…: the first differences hold the slope
            three = np.stack(sigmas[k : k + 3])
            agree = (three.max(axis=0) <= NOISE_WIDE_AGREE * three.min(axis=0)) & changes[k] & np.isfinite(three).all(axis=0)
            take = agree & ~decided
            found = np.where(take, sigmas[k], found)
            decided |= agree
    return found


def _differences_of(lines: np.ndarray) -> list[np.ndarray]:
    """The differences of order 1…NOISE_WIDE_ORDERS along each line of (lines, points, outputs)."""
    orders = [lines]
    for _ in range(NOISE_WIDE_ORDERS):
        orders.append(orders[-1][:, 1:] - orders[-1][:, :-1])
    return orders[1:]


def _noise_squares(values: np.ndarray, f0: np.ndarray) -> np.ndarray:
    """The NOISE_ORDER-th differences along each noise line (`_noise_rows`: the point, then
    values at NOISE_POINTS − 1 steps), squared and scaled to the variance of independent
    rounding, per output (f0: one value per output): (lines, points, outputs). Column 0 is the
    difference through the point, the others lie beside it. NaN and inf stay as they are."""
    lines = values.reshape(NOISE_LINES, NOISE_POINTS - 1, -1)
    differences = np.concatenate([np.broadcast_to(f0.reshape(1, 1, -1), (NOISE_LINES, 1, lines.shape[2])), lines], axis=1)
    for _ in range(NOISE_ORDER):
        differences = differences[:, 1:] - differences[:, :-1]
    return differences**2 / math.comb(2 * NOISE_ORDER, NOISE_ORDER)


def _differences(f: torch.Tensor, f0: torch.Tensor | float, h: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The quantities the estimate is built of, from the values at θ + t·h for t in OFFSETS
    (rows of `f`) and at θ (`f0`): central differences D(h), D(h/2), D(h/4), their Richardson
    extrapolations, and the second differences of the even part. All linear in the values."""
    f_h, f_half, f_quarter, m_quarter, m_half, m_h = f
    d1 = (f_h - m_h) / (2 * h)
    d2 = (f_half - m_half) / h
    d4 = (f_quarter - m_quarter) / (h / 2)
    r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
    e1 = (f_h + m_h - 2 * f0) / h**2
    e2 = (f_half + m_half - 2 * f0) / (h / 2) ** 2
    e4 = (f_quarter + m_quarter - 2 * f0) / (h / 4) ** 2
    q1, q2 = (4 * e2 - e1) / 3, (4 * e4 - e2) / 3
    # A kink at θ: second differences that do not fall as h³ from one half-step to the next.
    s_h, s_half, s_quarter = f_h + m_h - 2 * f0, f_half + m_half - 2 * f0, f_quarter + m_quarter - 2 * f0
    return {
        "value": r2 + (r2 - r1) / 15, "t2": d1 - d2, "t4": r2 - r1, "q2": q2, "s2": e1 - e2, "s4": q2 - q1,
        "jump_h": (s_h - 4 * s_half) / h, "jump_half": (s_half - 4 * s_quarter) / (h / 2),
    }


def _weights() -> dict[str, float]:
    """Per quantity of `_differences`, the norm of its weights over the seven values at h = 1:
    times σ (and divided by h, or h² for the even ones) its rounding's standard deviation."""
    eye = torch.eye(7, dtype=torch.float64)
    return {k: float(v.norm()) for k, v in _differences(eye[:6], eye[6], 1.0).items()}


WEIGHTS = _weights()


def _estimates(
    f: torch.Tensor,
    h: torch.Tensor,
    f0: float | torch.Tensor,
    theta: torch.Tensor | None = None,
    noise: float | torch.Tensor = 0.0,
    groups: int = 1,
) -> dict[str, torch.Tensor]:
    """Value, error bar, one-sided derivatives and kink flag from the six values per column at
    θ + t·h, t in OFFSETS (`f0`: the value at the point, one for every column or one per
    column; `theta`: the perturbed elements' values, whose own rounding inside the forward is
    noise too; `noise`: the forward's measured rounding σ; `groups`: the columns are that many
    equal blocks, each judged as if alone, as the kink's floor is), with the bar's two parts
    (`truncation`, `rounding`) that the choice of step weighs, and `wide`: a step not small
    against the function's own scale.

    The value is D(h/4) extrapolated twice (error O(h⁶)). Its rounding part is ROUNDING_SIGMAS·σ
    times the norm of its weights. Its truncation part is predicted from the Taylor terms the
    six values resolve (`_truncation`). Computed in numpy: a few dozen operations on short
    vectors, called for every batch of elements and every direction."""
    values = _array(f)
    n = values.shape[1]
    h_ = _columns(h, n)
    f0_ = _columns(f0, n)
    with np.errstate(all="ignore"):
        q = _differences(values, f0_, h_)
        value = q["value"]
        sigma = _columns(np.maximum(_array(noise), 0.0), n)
        sigma = np.maximum(sigma, ROUNDING_FLOOR * np.maximum(np.abs(values).max(axis=0), np.abs(f0_)))
        if theta is not None:
            # The forward rounds θ's contribution at every use (sin(2πt/86400) at t ≈ 1.7e9, x − mean
            # at x ≈ 1e5): noise of ~eps·|θ·∂f/∂θ| in f, this element's own share of the measured σ.
            own = EPS * np.abs(_array(theta)) * np.abs(value)
            sigma = sigma + np.where(np.isnan(own), 0.0, own)

        def noise_of(key: str, power: int = 1) -> np.ndarray:
            return sigma * WEIGHTS[key] / h_**power

        truncation, slope_seen = _truncation(q, h_, sigma)
        rounding = ROUNDING_SIGMAS * noise_of("value")
        error = np.where(np.isfinite(value), truncation + rounding, math.inf)
        f_h, f_half, f_quarter, m_quarter, m_half, m_h = values
        right = 2 * (f_quarter - f0_) / (h_ / 4) - (f_half - f0_) / (h_ / 2)
        left = 2 * (f0_ - m_quarter) / (h_ / 4) - (f0_ - m_half) / (h_ / 2)
        # On a kink the second differences' jump is the same at h and h/2; on a smooth function
        # it falls 8× (as h³). Seen at the smaller one, clear of rounding and of the smooth share.
        jump_h, jump_half = np.abs(q["jump_h"]), np.abs(q["jump_half"])
        spread = np.maximum(np.abs(left), np.abs(right))
        largest = _finite_or(spread, 0.0).reshape(groups, -1).max(axis=1).repeat(n // groups) if n else 0.0
        floor = KINK_RELATIVE * np.maximum(spread, largest * 1e-3)
        kink = (jump_half > KINK_SIGMAS * noise_of("jump_half")) & (jump_half > floor) & (jump_half > jump_h / 2)
        # On a kink the derivative is the interval [left, right], not the value; no series there.
        truncation = np.where(kink, 0.0, truncation)
        error = np.where(kink, rounding, error)
        # Bitwise equal values at two neighbouring stencil points, where the estimate says the
        # function changes visibly over a quarter step: a staircase finer than the step (round(x,
        # 3) at a step of 2e-4, a histogram). Its difference quotients count stairs, not a slope,
        # and can agree across steps by chance; `settle` checks such a column at smaller steps.
        flat = ((f_h == f_half) | (f_half == f_quarter) | (f_quarter == f0_) | (f0_ == m_quarter)
                | (m_quarter == m_half) | (m_half == m_h)) & (np.abs(value) > 16 * rounding)
        # Clear terms beyond the second falling by less than WIDE per order: the step is too wide.
        wide = (slope_seen > math.log(WIDE)) & np.isfinite(value)
    out = {
        "value": value, "error": error, "left": left, "right": right, "kink": kink,
        "truncation": truncation, "rounding": rounding, "flat": flat, "wide": wide,
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def _columns(value: torch.Tensor | np.ndarray | float, n: int) -> np.ndarray:
    """`value` (one number, or one per column) as n columns."""
    found = _array(value)
    return found if found.shape == (n,) else np.broadcast_to(found, (n,))


_LARGEST = float(np.finfo(np.float64).max)


def _finite_or(value: np.ndarray, nan: float) -> np.ndarray:
    """`np.nan_to_num(value, nan=nan)` (±inf become ±the largest float) in four ufunc calls, a
    fraction of nan_to_num's own cost on the short vectors here."""
    return np.where(np.isnan(value), nan, np.minimum(np.maximum(value, -_LARGEST), _LARGEST))


def _array(value: torch.Tensor | np.ndarray | float) -> np.ndarray:
    """`value` as a float64 numpy array (a CPU float64 tensor without a copy)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype != torch.float64 or value.device.type != "cpu":
            value = value.to("cpu", torch.float64)
        return value.numpy()
    return np.asarray(value, dtype=np.float64)


# The Taylor terms a_k = |f⁽ᵏ⁾|·h^(k−1)/k!, k = 1…6, in the derivative's units: the quantity of
# `_differences` each is read from, the power of h it is divided by, and its weight.
TERMS = (("value", 1, 1.0), ("q2", 2, 2.0), ("t2", 1, 0.75), ("s2", 2, 1.5), ("t4", 1, 15 / 64), ("s4", 2, 15 / 32))


def _truncation(
    q: dict[str, np.ndarray], h: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """TRUNCATION_SAFETY times the h⁶ term left in the value, |f⁽⁷⁾|·h⁶/7!/64, predicted from
    the terms a_k (`TERMS`: the value, the curvature, the corrections t2, t4 of the odd part and
    s2, s4 of the even part), each counted where it stands RESOLVED_SIGMAS of its rounding
    (σ, the forward's, times the term's weights) clear; and per column the rate at which the
    last clear term falls (log x).

    The terms of a function smooth at the step's scale fall geometrically, by x = h/ρ per order
    (ρ: its own scale, the distance to its nearest singularity), under an envelope that a term
    may dip below at a point (a pair of complex singularities makes them oscillate): the rate
    into a clear term is the least over the clear terms before it (the upper hull of log a_k),
    and the h⁶ term is the largest of the clear terms carried on at their rates."""
    terms = np.abs(np.stack([q[key] for key, _, _ in TERMS]))  # (6, columns)
    size = terms * (h ** _TERM_POWERS_LESS_ONE / _TERM_WEIGHTS)
    logs = np.log(np.maximum(size, np.finfo(np.float64).tiny))
    clear = terms > RESOLVED_SIGMAS * (sigma * _TERM_NOISE_WEIGHTS / h**_TERM_POWERS)  # σ·weight/hᵖ: each term's rounding
    slopes = (logs[:, None] - logs[None, :]) / _APART_AT_LEAST_ONE
    slope = np.where(_BELOW & clear[None, :, :], slopes, math.inf).min(axis=1)  # (6, columns), per high term
    usable = clear & np.isfinite(slope) & _FROM_THIRD
    carried = np.where(usable, np.exp(logs + _ORDERS_TO_SEVENTH * np.where(usable, slope, 0.0)), 0.0)
    seventh = carried.max(axis=0)
    last = np.where(usable, _ORDERS, 0.0).argmax(axis=0)
    slope_seen = np.where(usable.any(axis=0), slope[last, np.arange(last.size)], -math.inf)
    return _finite_or(TRUNCATION_SAFETY * seventh / 64, math.inf), slope_seen


# `_truncation`'s constants, per term of TERMS (rows) and pair of them (high, low, columns).
_TERM_POWERS = np.array([[power] for _, power, _ in TERMS], dtype=np.float64)
_TERM_POWERS_LESS_ONE = _TERM_POWERS - 1
_TERM_WEIGHTS = np.array([[weight] for _, _, weight in TERMS])
_TERM_NOISE_WEIGHTS = np.array([[WEIGHTS[key]] for key, _, _ in TERMS])
_ORDERS = np.arange(1, 7, dtype=np.float64)[:, None]
_APART = _ORDERS - _ORDERS.T  # high − low
_APART_AT_LEAST_ONE = np.maximum(_APART, 1)[:, :, None]
_BELOW = (_APART > 0)[:, :, None]
_FROM_THIRD = _ORDERS >= 3
_ORDERS_TO_SEVENTH = 7 - _ORDERS


def settle(
    best: dict[str, torch.Tensor],
    at: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    floor: torch.Tensor,
    validate: torch.Tensor,
    small: torch.Tensor,
    confirm: torch.Tensor | None = None,
    enough: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The step chosen from the function, not from the size of its inputs. `best` holds one
    estimate per column with its `step`; `at(columns, steps)` estimates columns again.

    A column is unsettled when its estimate is on a kink or when `validate` asks (and, once
    checked, while its bar is mostly truncation: a smaller step buys a smaller one). Each round
    estimates the unsettled columns at a step SHRINK times smaller and compares:

    - off a kink at both steps, the two estimates agree within their bars: settled, at the
      step whose bar is smaller (a bar small by chance at a step wider than the function's
      features is caught here: the estimates disagree);
    - a kink at KINK_STEPS steps in a row with the same one-sided derivatives, the last one
      no wider than `small` (KINK_STEP, in each column's units): a
      real kink;
    - otherwise (a kink seen at the wider step only, or estimates that disagree) the smaller
      step's estimate is taken and checked in the next round: a step wider than a feature
      of the function is never taken for a kink or for the derivative.

    Agreement settles a column only at a step no wider than its `confirm`. A power-of-two step
    that is a multiple of half a feature's period reads it exactly as a line (or as flat: the
    loss is the same at θ ± h), at that step and at every wider one: ceil at 1e3 gives a slope
    of exactly 1 at steps 128 and 4, frac a slope of exactly 0. So a
    step set by the size of θ is confirmed down to CONFIRM_STEP, and a staircase of its own
    (`FiniteDifferences._coarse`) down to `small`; till then the smaller step's estimate is
    checked again, and the chain keeps the smallest bar of its agreeing estimates (a smooth
    function keeps its wide step's precision; ndtr at −5.4, a smooth function under stairs of
    rounding, too).

    A column whose bar is mostly truncation is taken at a smaller step for precision too
    (`_shrink_for`), unless its bar is already within its `enough`.

    A column still unsettled after SHRINKS rounds or at its `floor` keeps its last estimate,
    its bar widened by its distance to the one before: the bar stays honest."""
    # The bookkeeping runs in numpy: a few dozen operations on short vectors each round, which
    # in torch cost more in dispatch than in arithmetic (the arithmetic is the same: IEEE).
    best = {key: value.numpy() for key, value in best.items()}
    floor_, validate_, small_ = floor.numpy(), validate.numpy(), small.numpy()
    confirm_ = np.full(best["step"].shape, math.inf) if confirm is None else confirm.numpy()
    enough_ = np.zeros(best["step"].shape) if enough is None else enough.numpy()
    coarse = best["kink"] | validate_ | best["wide"] | (best["step"] > confirm_)
    pending = coarse | ((best["truncation"] > best["rounding"]) & (best["error"] > enough_))
    gap = np.zeros_like(best["error"])
    seen = np.zeros(best["error"].shape, dtype=np.int64)
    # Along a chain of agreeing steps not yet confirmed, the estimate with the smallest bar so
    # far (a smooth function keeps its wide step's precision).
    held = {key: value.copy() for key, value in best.items()}
    holding = np.zeros_like(validate_)
    for _ in range(SHRINKS):
        if not pending.any():
            break
        where = np.flatnonzero(pending)
        factor = np.where(coarse[where], SHRINK, _shrink_for(best["truncation"][where], best["rounding"][where]))
        h = best["step"][where] * factor
        keep = h >= floor_[where]
        where, h, factor = where[keep], h[keep], factor[keep]
        if not where.size:
            break
        other = {key: value.numpy() for key, value in at(torch.from_numpy(where), torch.from_numpy(h)).items()}
        other["step"] = h
        was = {k: v[where] for k, v in best.items()}
        smooth = ~was["kink"] & ~other["kink"]
        distance = np.abs(other["value"] - was["value"])
        agree = smooth & ~other["wide"] & (distance <= was["error"] + other["error"])
        deep = h > confirm_[where]
        settled = agree & ~deep
        moved = np.maximum(np.abs(other["left"] - was["left"]), np.abs(other["right"] - was["right"]))
        stable = other["kink"] & was["kink"] & (moved <= KINK_STABLE * np.abs(other["right"] - other["left"]))
        seen[where] = np.where(stable, seen[where] + 1, 0)
        # A smooth feature narrower than two steps in a row looks like a steady kink at both
        # (logsumexp(x/1e-3) at steps of 0.1 and 0.003 is max): a kink is real when it holds
        # over KINK_STEPS steps, 32² times apart.
        same_kink = (seen[where] >= KINK_STEPS - 1) & (h <= small_[where])
        # Agreeing, the two steps measure the wider one's truncation: the smaller step's is at
        # least SHRINK⁻² times less (O(h²) at worst; Richardson's is O(h⁴)), so its bar is its
        # rounding plus that: tight, where |D(h) − D(h/2)|/3 alone is the error of D(h/2).
        tight = np.minimum(other["error"], other["rounding"] + distance * factor**2)
        other["error"] = np.where(agree, tight, other["error"])
        prior = {key: np.where(holding[where], held[key][where], was[key]) for key in was}
        take = ~(settled & (prior["error"] <= other["error"]))
        smaller = other["error"] < prior["error"]
        for key in best:
            best[key][where] = np.where(take, other[key], prior[key])
            held[key][where] = np.where(smaller, other[key], prior[key])
        holding[where] = agree & deep
        gap[where] = np.where(agree | same_kink, 0.0, _finite_or(distance, math.inf))  # ±inf: ±the largest float
        pending = np.zeros_like(pending)
        # Agreeing, the smaller step's bar still mostly truncation: a smaller one may do better.
        better = settled & take & (other["truncation"] > other["rounding"]) & (other["error"] > enough_[where])
        pending[where] = ~(settled | same_kink) | better
        coarse[where] = ~(settled | same_kink)
    unsettled = (gap > 0) & ~np.where(holding, held["kink"], best["kink"])
    out = {}
    for key in best:  # a staircase's chain that agreed to the last step it could take
        out[key] = torch.from_numpy(np.where(holding, held[key], best[key]))
    out["error"] = torch.from_numpy(np.where(unsettled, np.maximum(out["error"].numpy(), gap), out["error"].numpy()))
    return out


def _shrink_for(truncation: np.ndarray, rounding: np.ndarray) -> np.ndarray:
    """The factor (a power of two, SHRINK to ½) that brings a step whose bar is mostly
    truncation to the one minimising the two: truncation falls as h⁶, rounding grows as 1/h."""
    with np.errstate(all="ignore"):
        best = (rounding / np.maximum(6 * truncation, np.finfo(np.float64).tiny)) ** (1 / 7)
        return np.clip(np.exp2(np.floor(np.log2(_finite_or(best, SHRINK)))), SHRINK, 0.5)


def _improves(best: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per column, whether `other` is the better estimate: off a kink where `best` is on one
    (a kink seen at one step only is a smooth bend), else a smaller finite error bar."""
    smaller = other["error"] < best["error"]
    return (~other["kink"] & best["kink"]) | ((other["kink"] == best["kink"]) & smaller)


def _better(best: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    better = _improves(best, other)
    return {k: torch.where(better, other[k], best[k]) for k in best}


class Batched:
    """Evaluates the loss for a batch of values of some tensors, with `vmap` where it works."""

    def __init__(self, loss: Loss, vmap: bool = True, linear: tuple[frozenset[str], Linear] | None = None) -> None:
        self.loss = loss
        # The tensors the loss is linear in, and the loss at many of their values in one call
        # (orders.py: order 2 of a Function vmap cannot batch, linear in its cotangents)
        self.linear = linear
        self.vmap_works = vmap  # False: the case knows vmap cannot batch it (orders.py)
        self.recordable = vmap  # False: its loss runs autograd inside (orders.py): never recorded
        self.note: str | None = None
        # per group of tensors, its recorded forward for one-element perturbations (None: none)
        self.programs: dict[tuple[str, ...], Program | None] = {}
        self._tiny: bool | None = None
        self._forward_seconds: float | None = None
        # The loss at the point (every target as given) from a plain forward pass, where the
        # caller has it: vmap's row there is checked against it, not a plain pass of its own.
        self.at_point: torch.Tensor | None = None

    def tiny(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor) -> bool:
        """Whether the check is too small for the replay to pay: REPLAY_CASE_FROM elements in
        all, a forward pass faster than REPLAY_SLOW_FORWARD (the faster of two: the first may
        pay first-use costs), and vmap batches it (two rows, the values of a plain call). Where
        vmap cannot batch the forward (a Function without a vmap rule), the replay is what
        spares a forward pass per perturbation: never tiny. Decided once."""
        if self._tiny is None:
            self._tiny = self.vmap_works and sum(t.numel() for t in targets.values()) < REPLAY_CASE_FROM
            if self._tiny:
                took = []
                for _ in range(2):
                    started = time.perf_counter()
                    plain = self.one(targets, flat, base)
                    took.append(time.perf_counter() - started)
                self._tiny = min(took) < REPLAY_SLOW_FORWARD and self._batches(targets, flat, base, plain)
        return self._tiny

    def recording_pays(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor, count: int) -> bool:
        """Whether recording the forward to replay `count` elements pays where vmap cannot batch
        it: always once the process has made its first recording (`FIRST_RECORDING`), before
        that where the forward passes one at a time, spent (`Looped`) and spared (len(OFFSETS)
        per element), take longer than it."""
        if _first_recording_paid():
            return True
        if self._forward_seconds is None:
            started = time.perf_counter()
            self.one(targets, flat, base)
            self._forward_seconds = time.perf_counter() - started
        return Looped.seconds + count * len(OFFSETS) * self._forward_seconds > FIRST_RECORDING

    def _batches(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor, plain: torch.Tensor) -> bool:
        """Whether vmap batches the forward at `base` (two rows equal to `plain`); a failure here
        changes nothing else (the evaluation that follows finds it again and says so)."""
        try:
            with torch.no_grad():
                values = _under_vmap(self.loss, targets, flat, torch.stack([base, base]))
            return _same(values[1], plain)
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - an op vmap cannot batch
            return False

    def one(self, targets: Mapping[str, torch.Tensor], flat: Flat, vector: torch.Tensor) -> torch.Tensor:
        """The loss at one flat vector of the tensors in `flat`."""
        with torch.no_grad():
            return self.loss({**targets, **flat.split(vector)})

    def program(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor) -> Program | None:
        """The forward recorded at `base` for one-element perturbations of the tensors in `flat`
        (replay.py), or None where it cannot be replayed: vmap of the whole forward then. Where
        vmap cannot batch the forward (a tile kernel's Function), the other floating-point
        tensors are traced too, never perturbed: what the forward makes from them (`out =
        torch.empty_like(q)` while k is perturbed) is then a value it follows, and a write into
        it can be replayed."""
        if not self.recordable:
            return None
        key = tuple(flat.shapes)
        if key not in self.programs:
            self.programs[key] = None
            others = [] if self.vmap_works else [
                name for name, t in targets.items() if name not in flat.shapes and t.is_floating_point()
            ]
            names = [*flat.shapes, *others]

            def loss(traced: Sequence[torch.Tensor]) -> torch.Tensor:
                return self.loss({**targets, **dict(zip(names, traced))})

            try:
                with torch.no_grad():
                    plain = self.one(targets, flat, base)
                    leaves = [*flat.split(base.clone()).values(), *(targets[name].clone() for name in others)]
                    self.programs[key] = Program.record(loss, leaves, plain)
            except CaseTimeout:
                raise
            except Exception:  # noqa: BLE001 - Unreplayable, or an error the plain forward reports
                pass
        return self.programs[key]

    def __call__(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        """The loss for each row of `batch`, a flat vector of the tensors in `flat`."""

        with torch.no_grad():
            if self.vmap_works:
                try:
                    values = _checked_under_vmap(self.loss, targets, flat, batch, self.at_point)
                    if values is not None:
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
            if self.linear is not None:
                return self._split_linear(targets, flat, batch)
            return _one_by_one(self.loss, targets, flat, batch)

    def _split_linear(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        """The rows of `batch` that move only tensors the loss is linear in, by the case's one
        batched call (its first and last rows checked against plain forward passes; not used
        again where one differs or it fails); the others one by one."""
        assert self.linear is not None
        names, rows_of = self.linear
        moving = [name for name in flat.shapes if name in names]
        fixed = [flat.slices[name] for name in flat.shapes if name not in names]
        base = flat.join(targets)
        still = torch.ones(len(batch), dtype=torch.bool)
        for part in fixed:
            still &= (batch[:, part] == base[part]).all(1)
        if not moving or int(still.sum()) < 2:
            return _one_by_one(self.loss, targets, flat, batch)
        values = torch.empty(len(batch), dtype=torch.float64)
        chosen = batch[still]
        columns = flat.columns(chosen)
        try:
            found = rows_of({**targets, **flat.split(base)}, {name: columns[name] for name in moving})
            for row in {0, len(chosen) - 1}:
                if not _same(found[row], self.one(targets, flat, chosen[row])):
                    raise RuntimeError("the batched rows differ from a plain forward")
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - what is not batched so is evaluated one by one, as before
            self.linear = None
            return _one_by_one(self.loss, targets, flat, batch)
        values[still] = found.to(torch.float64)
        if bool((~still).any()):
            values[~still] = _one_by_one(self.loss, targets, flat, batch[~still])
        return values


def _checked_under_vmap(
    loss: Loss, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor, at_point: torch.Tensor | None
) -> torch.Tensor | None:
    """`_under_vmap`, or None where vmap gives other values than a plain forward pass: a wrong
    vmap rule (a custom Function's own) must not corrupt the referee. One row is checked, the
    point itself where `at_point` (the loss there, from a plain pass) is known: a row more in
    the batch, a pass fewer, and a rule that computes the first row and repeats it is caught;
    else the first row, against a plain pass of its own."""
    if at_point is None:
        values = _under_vmap(loss, targets, flat, batch)
        row, plain = values[0], loss({**targets, **flat.split(batch[0])})
    else:
        values = _under_vmap(loss, targets, flat, torch.cat([batch, flat.join(targets)[None]]))
        values, row, plain = values[:-1], values[-1], at_point
    return values if _same(row.reshape(-1), plain.reshape(-1)) else None


def _under_vmap(loss: Loss, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
    """The loss at every row of `batch` (flat vectors of the tensors in `flat`) in one call of
    the forward under vmap, each tensor in storage of its own (`Flat.columns`)."""
    return torch.func.vmap(lambda parts: loss({**targets, **parts}), randomness="error")(flat.columns(batch))


def _one_by_one(loss: Loss, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
    """The loss at every row of `batch` by plain forward passes, one at a time, their time
    counted (`Looped`)."""
    started = time.perf_counter()
    values = torch.stack([loss({**targets, **flat.split(row)}) for row in batch])
    Looped.seconds += time.perf_counter() - started
    return values


class Looped:
    """The seconds this process has spent on forward passes one at a time where vmap could not
    batch them: once they pass FIRST_RECORDING, the first recording pays for itself (the loop
    already cost what it costs), as a ski rental does (`Batched.recording_pays`)."""

    seconds = 0.0


def _first_recording_paid() -> bool:
    """Whether this process has paid the replay's first recording: the import of
    torch.distributed.tensor that a tensor subclass's first dispatch makes (FIRST_RECORDING)."""
    return "torch.distributed.tensor" in sys.modules


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a differently ordered float64 sum."""
    return bool(torch.isclose(a, b, rtol=1e-12, atol=0.0, equal_nan=True).all()) or bool(
        ((a - b).abs() <= 1e-12 * b.abs().clamp(min=1.0)).all()
    )
