"""The numerical source: central differences of the forward pass in float64, the referee
between the manual and the autograd gradient.

Each element's derivative is estimated from the loss at θ ± h, θ ± h/2 and θ ± h/4, extrapolated
to O(h⁶), with an error bar that bounds its truncation and its rounding, at a step that follows
the function (stencil.py: `_estimates`, `settle`). The rounding is the forward's own, measured
at the point (noise.py). The perturbed points are evaluated in batches: one call of the forward
under vmap, the replay of one recording of it (replay.py), or a loop (batches.py). This module
decides what to estimate, where and how precisely; nodes are perturbed by injecting an offset
where `node()` marks them.

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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar
from dataclasses import dataclass, replace

import numpy as np
import torch

from backprop_check.model.case import Case
from backprop_check.records import unravel
from backprop_check.errors import CaseError, CaseTimeout
from backprop_check.model.forward import call_forward
from backprop_check.model.points import Point, derive_seed
from backprop_check.sources import Direction, Gradients
from backprop_check.sources.inplace import InPlace
from backprop_check.sources.batches import MAX_BATCH, MAX_BATCH_ELEMENTS, Batched, Flat, Known, _Probes, _program, evaluate, evaluate_steps
from backprop_check.sources.noise import (
    NOISE_ORDER, NOISE_POINTS, NOISE_ROWS, NOISE_ULPS, NOISE_WIDE_SCALE, STAIR_MOVE, _beyond, _float64_rounding, _measured_noise,
    STAIR_GROW, STAIR_GROWS, _noise_floor, _noise_of, _noise_rows, _output_noise_of, _stair_rows, rounding_stairs,
    still_beside, term_scales, terms_scale,
)
from backprop_check.sources.stencil import (
    EPS, OFFSETS, RELATIVE_STEP, ROUNDING_FLOOR, ROUNDING_SIGMAS, SHRINK, STEP_FLOOR_ULPS, _array, _better, _estimates, _step_floor,
    settle, steps_for,
)
# Where fn refuses a point a first step away (`_narrowed`):
NARROWER = 2.0**-7  # a first step the forward refuses is retried this much smaller (2⁻¹³)
NARROWINGS = 3  # and again, up to this many times (a matrix ≈ 1e6 + O(1): steps 2¹⁴, 2⁷, 1, 2⁻⁷)
SAMPLES = 24
DIRECTIONS = 2
# Forward mode's first settling round is evaluated with the first steps where that batch stays
# within MAX_BATCH rows and this many input or output elements (`along_many`'s `ahead`).
AHEAD_ELEMENTS = 1 << 18
FUSE_UP_TO = 1024
# Step multipliers (powers of two: θ ± m·h stays exact) tried where precision matters most.
REFINE_STEPS = (1.0, 8.0, 0.125)
# A direction's step multipliers: its O(h⁶) estimate at the elements' own steps and 8× below.
DIRECTION_STEPS = (1.0, 0.125)
# The smallest step multiplier along a direction (its largest element moved by ~1e-14 of itself).
DIRECTION_FLOOR = 2.0**-40
# A direction estimated again at smaller steps is smooth there where its one-sided derivatives
# agree within this many error bars (`Reference.unkinked`).
ERROR_BARS_KINK = 2.0
# Elements beyond this size have a step set by their value (RELATIVE_STEP·|θ|): always checked
# once at a smaller step. Below it the step is RELATIVE_STEP whatever θ, and only kinks, wide
# steps and bars that are mostly truncation cost more.
VALIDATE_FROM = 4.0
# A step set by θ's size is confirmed down to this one (`settle`): a power-of-two step that is a
# multiple of half a feature's period reads it exactly as a line (frac, floor and round at 1e3,
# period 1), and below a quarter no feature of period 1 or more can be read so.
CONFIRM_STEP = 2.0**-2
KINK_STEP = 2.0**-23  # a kink is confirmed at a step this small (three steps below 1e-4)
KINK_ULPS = 2.0**16
# The few elements a verdict hangs on (`Reference.refine`) are estimated this many times over at
# nearby steps and averaged: the bar's rounding part falls as √(AVERAGED/4).
AVERAGED = 32
# At most this many groups of tied elements on a kink are moved together, per tensor (`with_ties`).
TIE_GROUPS = 8
# Bisection stops at groups this small (checked element by element) or this many groups.
LEAF = 8
MAX_GROUPS = 8


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
        sigma = differences.noise[0]
        result.directions[name] = differences.along(name, vectors)
        index = finite[torch.randperm(finite.numel(), generator=gen)[:SAMPLES]].sort().values
        _store(result, differences.estimate([name], {name: index}), differences.targets, mask={name: index})
        if differences.noise[0] > sigma:
            # Where the loss stood still on the noise lines, the samples' estimate has measured
            # its stairs (`_coarse`): the directions again, their bars from that noise, not from
            # a floor 1e-8 times too small (a confident cross-entropy read as a slope of 0).
            result.directions[name] = differences.along(name, vectors)
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


# An element's error bar is loose when ERROR_BARS of it outweigh float64's rtol·|value| and a
# billionth of the tensor's largest gradient: the verdict on that element would hang on the bar
# alone. (float64's atol is 1e-12 of the largest; a bar between the two is mostly the rounding of
# the loss's large terms, which the refinement's steps do not take lower — 3.2e-4 at x[1] of
# x·[1e10, 1, 1] either way — so it is left as it is.)
LOOSE_BARS, LOOSE_RELATIVE, LOOSE_OF_LARGEST = 4.0, 1e-7, 1e-9
# An element whose LOOSE_BARS bars are below this fraction of LOOSE_RELATIVE·|value| (of the
# smallest rtol a case sets, where smaller) is precise enough: a smaller step would move the
# allowance its verdict is judged by less than that fraction, so `settle` takes none for
# precision's sake (it still does for every check it makes: kinks, staircases, a step set by
# the size of θ). A sigmoid's bar of 1e-11 of its value took a second batched forward pass.
PRECISE_ENOUGH = 2.0**-6
# Stairs are seen where the odd parts of the changes at h, h/2, h/4 (a smooth loss's halve, to
# f‴h³ and float64's rounding: ~1e-9 of the smallest change at STAIR_MOVE) are off by this much of
# the smallest change (a quantized loss's by a fraction of a stair, the stairs one or a few).
STAIR_SEEN = 2.0**-10
# Rounding moves a loss by a few ulps of the largest value its forward computes; noise this many
# ulps beyond it is no rounding (FiniteDifferences.rough).
ROUGH_BEYOND = 2.0**20
# The second move of `FiniteDifferences._coarse`, in units of the first: no ratio of small whole numbers.
STAIR_ASIDE = (math.sqrt(5) - 1) / 2


def _stair_residual() -> tuple[torch.Tensor, int]:
    """The projection onto what a cubic in the offset cannot fit, over the six values at OFFSETS
    and the value at the point (the last), and its degrees of freedom (`FiniteDifferences._coarse`)."""
    t = torch.tensor([*OFFSETS, 0.0], dtype=torch.float64)
    basis = torch.stack([t**k for k in range(4)], dim=1)
    return torch.eye(len(t), dtype=torch.float64) - basis @ torch.linalg.pinv(basis), len(t) - 4


STAIR_RESIDUAL, STAIR_RESIDUAL_DOF = _stair_residual()
# The forward computes values in a coarser dtype than float64 where the largest ulp among them is
# this many of float64's ulps of the largest value (`FiniteDifferences._coarser`).
COARSER_ULPS = 16.0
# At most this many of a tensor's loosest elements are re-estimated (three steps each), which
# bounds what the refinement adds to a full check of a large tensor.
MAX_TIGHTENED = 256


def _tighten(result: Gradients, differences: FiniteDifferences, names: Sequence[str]) -> None:
    """Re-estimate at the refinement steps (1, 8, ⅛) the elements estimated at one step whose
    error bar is loose (a steep function near its domain's edge: atanh at 0.996, where one
    step's bar is 1e-4 of the value and a wrong element by 1e-4 would hide under it)."""
    for name in names:
        value, error = result.values[name].reshape(-1), result.error[name].reshape(-1)
        if not value.numel():
            continue
        # The same arithmetic in numpy (IEEE, elementwise), where torch's dispatch costs more than
        # the work; torch again only where some element is loose (to rank and re-estimate them).
        v, e = value.detach().cpu().double().numpy(), error.detach().cpu().double().numpy()
        magnitude = np.abs(v)
        largest = float(np.where(np.isnan(magnitude), 0.0, np.minimum(magnitude, _LARGEST)).max())  # nan_to_num(0.0)
        allowed = LOOSE_RELATIVE * magnitude + LOOSE_OF_LARGEST * largest
        with np.errstate(all="ignore"):
            looseness = np.where(np.isfinite(v), LOOSE_BARS * e / np.maximum(allowed, _TINY), 0.0)
        if not (looseness > 1).any():  # also False where NaN, as torch's comparison
            continue
        looseness = torch.from_numpy(looseness)
        index = (looseness > 1).nonzero().reshape(-1)
        if index.numel() > MAX_TIGHTENED:
            index = index[looseness[index].topk(MAX_TIGHTENED).indices].sort().values
        if index.numel():
            estimate = differences.estimate([name], {name: index}, steps=REFINE_STEPS)
            current = {key: store[name].reshape(-1)[index] for key, store in
                       zip(("value", "error", "left", "right", "kink"), (result.values, result.error, result.left, result.right, result.kink))}
            unresolved = result.unresolved.get(name)
            current["unresolved"] = torch.zeros_like(current["kink"]) if unresolved is None else unresolved.reshape(-1)[index]
            estimate[name].setdefault("unresolved", torch.zeros_like(current["kink"]))
            whole = name not in result.checked
            _store(result, {name: _better(current, estimate[name])}, differences.targets, mask={name: index})
            if whole:  # still every element estimated, not a sample
                result.checked.pop(name, None)


_LARGEST = float(np.finfo(np.float64).max)
_TINY = float(np.finfo(np.float64).tiny)


def _smallest_rtol(rtol: object, default: float) -> float:
    """The smallest of `default` and the rtol a case sets (a number, or one per dtype name)."""
    given = rtol.values() if isinstance(rtol, Mapping) else [rtol]
    numbers = [float(value) for value in given if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return min([default, *(value for value in numbers if value >= 0)])


def held_fixed(targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per tensor with non-finite elements, where they are: no finite difference moves an
    infinite value (−inf + h is −inf), so those elements are held fixed and not estimated."""
    return {name: ~torch.isfinite(t) for name, t in targets.items() if t.is_floating_point() and not _all_finite(t)}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite (numpy's test on a CPU float64
    tensor, the usual target: the same answer at half the cost)."""
    if t.dtype == torch.float64 and t.device.type == "cpu":
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


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
        keeps few digits there) again, as precisely as the forward allows (`estimate`'s `alone`).
        Elements held fixed (`held_fixed`: a -inf of an attention mask) are left out: no finite
        step moves them, and a bisection's half may hold them."""
        held = held_fixed({name: self.differences.targets[name] for name in elements if name in self.differences.targets})
        wanted = {
            name: index[~held[name].reshape(-1)[index]] if name in held else index for name, index in elements.items()
        }
        wanted = {name: index for name, index in wanted.items() if index.numel()}
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

    def with_ties(self) -> Reference:
        """A new Reference with, per tensor, one direction for each group of elements that sit
        on a kink with exactly equal values (at most TIE_GROUPS, the largest): the group moved
        together. Each alone is a kink, and any value between its one-sided derivatives passes:
        a max-pool backward that routes the gradient to every tied element (4× the true one over
        a window of four equal pixels) passes element by element. Moved together, the tie stays
        a tie and a max is smooth: the sum of their gradients is the derivative along them. A
        kink along the group too (relu at several zeros) keeps its interval."""
        found: dict[str, list[Direction]] = {}
        for name, kink in self.gradients.kink.items():
            if name not in self.differences.scales:
                continue
            sampled = name in self.gradients.checked
            if not bool(kink.any()) and not sampled:
                continue
            values = self.differences.scales[name].reshape(-1).to(torch.float64)
            where = kink.reshape(-1).nonzero().reshape(-1)
            _, group, counts = torch.unique(values[where], return_inverse=True, return_counts=True)
            tied = [where[group == g] for g in counts.argsort(descending=True)[:TIE_GROUPS].tolist() if int(counts[g]) > 1]
            shape = tuple(self.differences.targets[name].shape)
            vectors, labels = [], []
            for members in tied:
                vector = torch.zeros(values.numel(), dtype=torch.float64)
                vector[members] = steps_for(values[members])
                vectors.append(vector.reshape(shape))
                shown = ", ".join(f"{name}[{', '.join(map(str, unravel(int(i), shape)))}]" for i in members[:4].tolist())
                more = f" and {members.numel() - 4} more" if members.numel() > 4 else ""
                labels.append(f"the tied elements {shown}{more} moved together")
            if sampled:
                # A sample of a large tensor seldom holds a tie (two tied maxima among 384 pixels
                # of integer values), and a random direction passes one where it moves the tied
                # elements apart (the average of the one-sided derivatives is what a backward that
                # routes the gradient to both says there). Every element that shares its value
                # with another, each group moved together, keeps every tie a tie: smooth where its
                # ties are the kinks, and it weighs each tie's sum of gradients. Nothing where no
                # two values are equal (floats drawn at random).
                _, group, counts = torch.unique(values, return_inverse=True, return_counts=True)
                shared = ((counts[group] > 1) & torch.isfinite(values)).nonzero().reshape(-1)  # not a held -inf
                if shared.numel():
                    vector = torch.zeros(values.numel(), dtype=torch.float64)
                    vector[shared] = steps_for(values[shared])
                    vectors.append(vector.reshape(shape))
                    labels.append(f"the {shared.numel()} elements that share their value with another moved together, each group as one")
            if not vectors:
                continue
            found[name] = [replace(d, what=label) for d, label in zip(self.differences.along(name, vectors), labels)]
        if not found:
            return self
        merged = self.gradients.copy()
        for name, directions in found.items():
            merged.directions[name] = [*merged.directions.get(name, []), *directions]
        return Reference(self.differences, merged)

    def unkinked(self, name: str, direction: Direction) -> tuple[Reference, Direction]:
        """A direction that shows a kink at the point, replaced by one that does not, where one
        is found (else this Reference and `direction`). A direction on a kink judges nothing
        (several kinks at the point add their one-sided derivatives per side), and its
        bisection finds little: every half is on kinks too. Where some elements share their
        value with another (a third of the inputs exactly 0 under a ReLU, ties in a pool), the
        same signs without them: the point's kinks are mostly there, and an element on a kink
        passes anything between its one-sided derivatives anyway (they are still sampled one by
        one). Else `direction` again with a kink counted only where it holds down to the
        smallest steps (DIRECTION_FLOOR): a feature closer to the point than the kink step is
        taken for one at it, and a direction across several (the near-ties of a sort: 50,000
        values of randn come as close as 1e-9) is smooth below them."""
        values = self.differences.scales[name].reshape(-1).to(torch.float64)
        _, group, counts = torch.unique(values, return_inverse=True, return_counts=True)
        shared = counts[group] > 1
        vector = direction.vector.reshape(-1).clone()
        if bool((shared & (vector != 0)).any()) and bool((~shared & (vector != 0)).any()):
            # Exact ties (zeros under a ReLU): the direction without them. Taken first: at a kink
            # of the point the smallest steps below see its jump drown in rounding, not vanish.
            vector[shared] = 0.0
            (found,) = self.differences.along(name, [vector.reshape(direction.vector.shape)], steps=(direction.step,))
        else:
            (found,) = self.differences.along(name, [direction.vector], steps=(direction.step,), kinks_to=DIRECTION_FLOOR)
        # A kink, or one-sided derivatives still apart beyond the bar (a kink the small steps'
        # rounding hides): nothing better found.
        if found.kink or not abs(found.left - found.right) <= ERROR_BARS_KINK * found.error:
            return self, direction
        merged = self.gradients.copy()
        merged.directions[name] = [found if d is direction else d for d in merged.directions[name]]
        return Reference(self.differences, merged), found

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
    """The loss as a function of every parameter and node offset, at a point as `dtype` sees it.
    With `inside`, the forward runs in that dtype, the steps still taken in float64: the dtype's
    own function, where it is another than its float64 twin (rounding.own_function_allowances)."""

    def __init__(self, case: Case, point: Point, dtype: torch.dtype, precise: bool = False, inside: torch.dtype | None = None) -> None:
        at = point.rounded(dtype)
        here = at if inside is None else at.cast(inside)
        with torch.no_grad():
            loss0, tape = call_forward(case, here)
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
            params = {k: values[k] if inside is None else values[k].to(inside) for k in at.params}
            offsets = {k: values[k] for k in nodes}
            return call_forward(case, replace(here, params=params), offsets)[0].to(torch.float64)

        # numpy case: no vmap, no tensor rows; each element perturbed in place (inplace.py)
        linear = case.linear_names() if not case.numpy and not nodes and inside is None else ()  # used where vmap cannot batch

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
        # The noise lines moved the loss by far more than rounding can (ROUGH_BEYOND ulps of the
        # largest value its forward computes at the point): it jumps at their scale (pinv of a
        # rank-deficient matrix), and a bar made of that noise resolves nothing.
        self.rough = False
        self._scales: tuple[float, float] | None = None  # `term_scales` of the forward at the point, once

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

    def _coarse(self, whole: Flat, chosen: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per element in `chosen`, whether the loss stands still at one at least of the points
        θ ± STAIR_MOVE·max(1, |θ|), θ ± half and a quarter of it, the element alone moved: a
        staircase of its own there (one stair crossed near its edge moves some of them, not
        all), not the rounding of a function computed in float32 (every one moves, across many
        of its stairs). Element by element: with many elements moving at once, some cross.

        Where it stands still, the stairs' height says which (`rounding_stairs`): the element
        moves on, STAIR_GROW times further each time, until the loss changes. Stairs of rounding
        (a smooth loss rounded at a coarser scale than its own ulp) are no staircase; their
        height, as σ, is the loss's noise (a uniform rounding's: height/√12), which the noise
        lines, too narrow to cross them, could not see. The loss's σ (`noise`) takes the lowest
        stairs seen; each element's own stairs are returned too, as its σ (0 where none are
        rounding): stairs of float32's rounding are as high as the float32 values an element moves
        and what multiplies them (a cross-entropy computed in float32 steps by 1.3e-9 in a row whose
        loss is 0.01 and by 1.7e-7 in one whose loss is 2: the lowest as every element's σ left the
        bars of the second row 100 times too small)."""
        none = torch.zeros(chosen.numel(), dtype=torch.float64)
        h = torch.ones(whole.size, dtype=torch.float64)
        h[chosen] = STAIR_MOVE * scale[chosen].abs().clamp(min=1.0)
        f0 = float(self.loss0)
        try:
            f = evaluate(self.batched, self.targets, whole, h, chosen)
        except CaseTimeout:
            raise
        except CaseError:  # fn refuses a point that far (a domain's edge): no staircase said
            return torch.zeros(chosen.numel(), dtype=torch.bool), none
        coarse = (f[:, chosen] == f0).any(dim=0)
        if not math.isfinite(f0):
            return coarse, none

        def stairs_of(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """The smallest change of the loss at the six offsets (inf: none), whether the
            changes show stairs: a smooth loss's odd part is proportional to the offset (the
            differences at h, h/2 and h/4 halve), a quantized one's is off by a stair; and the
            σ of what is left of the seven values off the cubic nearest them (`STAIR_RESIDUAL`):
            over so short a stretch a smooth loss is a cubic far below its rounding."""
            moves = (f - f0).abs()
            jump = torch.where((moves > 0) & torch.isfinite(moves), moves, math.inf).amin(dim=0)
            d1, d2, d4 = f[0] - f[5], f[1] - f[4], f[2] - f[3]
            off = torch.maximum((d1 - 2 * d2).abs(), (d2 - 2 * d4).abs())
            left = STAIR_RESIDUAL @ torch.cat([f, torch.full_like(f[:1], f0)]).to(torch.float64)
            residual = (left.square().sum(dim=0) / STAIR_RESIDUAL_DOF).sqrt().nan_to_num(0.0, posinf=0.0)
            # Off that cubic by as much shows stairs too, where the odd parts happen to halve (a
            # loss computed in float32 moved by 10, 5, 3, −2, −5 and −10 of its stairs of 7e-7).
            return jump, torch.isfinite(jump) & (torch.maximum(off, residual) >= jump * STAIR_SEEN), residual

        # a loss that moved crossed a stair at least
        jumps, seen, residual = stairs_of(f[:, chosen])
        first = h.clone()
        for _ in range(STAIR_GROWS):
            waiting = torch.isinf(jumps)
            if not bool(waiting.any()):
                break
            h[chosen] = h[chosen] * STAIR_GROW
            try:
                f = evaluate(self.batched, self.targets, whole, h, chosen[waiting])
            except CaseTimeout:
                raise
            except CaseError:  # fn refuses a point that far: the stairs stay unmeasured there
                break
            jumps[waiting], seen[waiting], residual[waiting] = stairs_of(f[:, chosen[waiting]])
        if self._coarser():
            # Where the forward computes float32 values, one stair a quarter step makes a line as
            # well as a slope does (−4, −2, −1, 1, 2, 4 stairs of 1.7e-7): an element that moved at
            # every point without showing stairs moves again, STAIR_ASIDE of that, where the
            # counts of the same stairs make no line.
            aside = torch.isfinite(jumps) & ~seen & ~coarse
            if bool(aside.any()):
                h = first * STAIR_ASIDE
                try:
                    f = evaluate(self.batched, self.targets, whole, h, chosen[aside])[:, chosen[aside]]
                except CaseTimeout:
                    raise
                except CaseError:  # fn refuses a point that far: what the first moves showed stands
                    f = None
                if f is not None:
                    more, shown, scatter = stairs_of(f)
                    jumps[aside] = torch.minimum(jumps[aside], more)
                    seen[aside] = shown | (f == f0).any(dim=0)
                    residual[aside] = torch.maximum(residual[aside], scatter)
        # Where the loss stood still at some of the points and moved at others, it has stairs
        # whatever its values' shape says: counts of one float32 stair can make a line (a
        # cross-entropy computed in float32 moved by 4, 2, 1, 0, −2 and −4 stairs of 1.7e-7: taken
        # for a staircase of its own, and read as 0 ± 0.027 where the gradient is 0.21).
        seen = seen | (coarse & torch.isfinite(jumps))
        if not bool(seen.any()):
            return coarse, none
        rounding = seen & rounding_stairs(jumps, self._term_scales()[1])
        if bool(rounding.any()):
            sigma, still = self.noise
            self._noise = (max(sigma, float(jumps[rounding].min()) / math.sqrt(12)), still)
        # An element's own: its lowest stair, or what its values scatter by, where that is more
        # (the lowest change may be one stair of a small term, or a slope a stair cancels in part,
        # where the element moves several float32 values: tanh((x @ W1).float()) by x).
        own = torch.where(rounding, torch.maximum(jumps / math.sqrt(12), residual), 0.0)
        if self._coarser():
            # Where the loss computed in float32 did not move at all as the element moved by
            # STAIR_GROW^STAIR_GROWS of STAIR_MOVE, the element's gradient is below what its stairs
            # resolve (a logit of a confident float32 cross-entropy: 1.5e-5, read as 0 ± 2e-6):
            # its σ is the highest stairs seen, the loss's stairs it did not cross.
            own = torch.where(torch.isinf(jumps), own.max(), own) if own.numel() else own
        return coarse & ~rounding, own

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
        f0 = abs(float(self.loss0))
        if math.isfinite(sigma) and math.isfinite(f0) and sigma > ROUGH_BEYOND * EPS * f0:
            self.rough = sigma > ROUGH_BEYOND * EPS * self.terms()
        self._noise = (sigma, still)

    def _coarser(self) -> bool:
        """Whether the forward computes floating-point values in a coarser dtype than float64
        (float32's ulp on a value of 2⁻²⁵ of the largest or more: x.float() inside a float64 check),
        whose rounding the noise lines, NOISE_ULPS of float64's ulps apart, cannot move."""
        largest, coarsest = self._term_scales()
        return coarsest > COARSER_ULPS * EPS * largest

    def terms(self) -> float:
        """The largest magnitude among the inputs and the values the forward computes from them
        (`terms_scale`): the scale its rounding lives at where the loss itself is 0."""
        return self._term_scales()[0]

    def _term_scales(self) -> tuple[float, float]:
        """`term_scales` at the point: the largest value and the largest ulp, traced once."""
        if self._scales is None:
            loss = self._loss  # numpy: nothing to trace, the inputs alone
            self._scales = term_scales(None if loss is None else lambda: loss(self.targets), *self.scales.values())
        return self._scales

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
        # Standing still on the noise lines: a staircase of its own, or a smooth loss rounded at a
        # coarser scale than its ulp, whose stairs give its noise (`_coarse`) before any estimate.
        # So too where the forward computes values in a coarser dtype than float64 (x.float()):
        # the lines move no float32 value, and where a float64 input moves the loss past them
        # (tanh(x.float()).double() @ w, w differentiated too) they do not stand still, and saw
        # float64's rounding alone; x's steps, read with that σ, disagreed by float32's stairs at
        # every step down to where x moved no float32 value and the loss stood still: 0 ± 2e-6.
        coarse, stairs_sigma = self._coarse(whole, chosen, scale) if still or self._coarser() else (None, None)
        sigma, still = self.noise
        if alone:
            sigma = self._own_noise(whole, chosen, scale)
        if stairs_sigma is not None and bool((stairs_sigma > 0).any()):
            # each element's own stairs (`_coarse`), where they are higher than the loss's lowest
            sigma = torch.maximum(torch.as_tensor(sigma, dtype=torch.float64), stairs_sigma)
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
        stairs = coarse & sloped if coarse is not None and bool(sloped.any()) else None
        # Not finite a first step away (asin at 0.99, θ + h past the domain's edge): smaller
        # steps, as for any step wider than the function allows.
        best["flat"] = best["flat"] | ~torch.isfinite(best["value"])
        best = self._settled(whole, scale, chosen, best, sigma, stairs, known, precise=self.precise or alone or len(steps) > 1)
        if self.rough:
            best["unresolved"] = torch.ones_like(best["kink"])
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
        if len(names) == 1:  # one tensor: its estimates are the columns, no slice to take
            return {names[0]: best}
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
        floor = _step_floor(theta)
        small = torch.maximum(torch.full_like(theta, KINK_STEP), floor * (KINK_ULPS / STEP_FLOOR_ULPS))
        sized = theta.abs() > VALIDATE_FROM
        confirm = _confirmed_at(sized, torch.full_like(theta, CONFIRM_STEP), stairs, small)
        enough = None if precise else PRECISE_ENOUGH * self.relative / LOOSE_BARS * best["value"].abs().nan_to_num(0.0)
        return settle(best, at, floor, sized | best["flat"], small, confirm, enough)

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
        try:
            f = evaluate(self.batched, self.targets, whole, full, chosen[where])
        except CaseError:  # fn refuses the wider step (Bernoulli's p of 1e-8 moved below 0): the settled one stands
            return self._averaged(whole, scale, chosen, best, sigma)[0]
        other = _estimates(f[:, chosen[where]], h, float(self.loss0), scale[chosen][where], sigma[where])
        other["step"] = h
        other["unresolved"] = torch.zeros_like(other["kink"])  # taken only where it agrees
        was = {k: v[where] for k, v in best.items()}
        take = (
            ~other["kink"] & ~other["wide"] & (other["error"] < was["error"])
            & ((other["value"] - was["value"]).abs() <= other["error"] + was["error"])
        )
        for key in best:
            best[key][where] = torch.where(take, other[key], was[key])
        best, apart = self._averaged(whole, scale, chosen, best, sigma)
        # A wider step whose neighbours read another slope straddles a feature of the function
        # (a saturated tanh whose flat stretch ends within it): the settled estimate stands.
        back = take & apart[where]
        if bool(back.any()):
            for key in best:
                best[key][where[back]] = was[key][back]
        return best

    def _averaged(
        self, whole: Flat, scale: torch.Tensor, chosen: torch.Tensor, best: dict[str, torch.Tensor], sigma: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Where rounding dominates a bar, AVERAGED estimates at steps a little smaller than the
        chosen one (h·(1 − j/64): a new rounding each, the same function) are averaged, and
        the rounding part of the bar falls as √(AVERAGED/4) (a quarter of the draws counted:
        their roundings need not be independent); the truncation part stays that of the widest.
        Where they disagree beyond two of its bars, nothing is averaged, and the elements are
        returned as apart (a saturated LSTM gate's 0, averaged across where its flat stretch ends
        at the widened step, was read as −0.07 ± 5e-12)."""
        where = (~best["kink"] & torch.isfinite(best["value"]) & (best["rounding"] > best["truncation"])).nonzero().reshape(-1)
        apart = torch.zeros_like(best["kink"], dtype=torch.bool)
        if not where.numel():
            return best, apart
        h = best["step"][where]
        values = [best["value"][where]]
        for j in range(1, AVERAGED):
            full = torch.ones(whole.size, dtype=torch.float64)
            full[chosen[where]] = h * (1 - j / 64)
            f = evaluate(self.batched, self.targets, whole, full, chosen[where])
            values.append(_estimates(f[:, chosen[where]], h * (1 - j / 64), float(self.loss0), scale[chosen][where], sigma[where])["value"])
        stack = torch.stack(values)
        # The same function with a new rounding at each step: values that disagree beyond two
        # of the chosen estimate's bars are another function (a slope that changes within the
        # step), and are not averaged.
        off = ((stack - stack[0]).abs().amax(dim=0) > 2 * best["error"][where]) | ~torch.isfinite(stack).all(dim=0)
        apart[where[off]] = True
        keep = where[~off]
        rounding = best["rounding"][keep] / (1 - (AVERAGED - 1) / 64) / math.sqrt(AVERAGED / 4)
        best["value"][keep] = stack[:, ~off].mean(dim=0)
        best["rounding"][keep] = rounding
        best["error"][keep] = best["truncation"][keep] + rounding
        return best, apart

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

    def along(
        self, name: str, vectors: Sequence[torch.Tensor], steps: Sequence[float] = DIRECTION_STEPS, kinks_to: float | None = None
    ) -> list[Direction]:
        """The loss's derivative along each vector (in the units of the vector), by two rounds
        of Richardson extrapolation over three steps (error O(h⁶); the error bar as for an
        element, `_estimates`), at the step multiplier of `steps` (1, ⅛)
        whose error bar is smallest off a kink. One direction costs 6 forward passes a step
        multiplier: cheap next to the precision it buys, which is what a single wrong element
        among millions needs. A kink is one that holds down to the kink step, or to the
        multiplier `kinks_to` (`Reference.unkinked`)."""
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
        small = _kink_multipliers(largest) if kinks_to is None else torch.full((len(vectors),), kinks_to, dtype=torch.float64)
        stairs = self.stairs & (best["value"].abs() > 16 * best["rounding"])
        confirm = _confirmed_at(validate, _confirm_multipliers(largest), stairs, small)
        # A direction not finite a first step away (past a domain's edge) is taken at smaller steps.
        best = settle(best, again, torch.full((len(vectors),), DIRECTION_FLOOR), validate | ~torch.isfinite(best["value"]), small, confirm)
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


PARTS = ("values", "error", "left", "right", "kink", "unresolved")


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
        # Stored already with no mask of its own: every element is estimated (a whole tensor, or
        # a sample that grew to all of it), and a re-estimate of some leaves it so.
        whole = name in result.values and name not in result.checked
        for part, key in zip(PARTS, ("value", "error", "left", "right", "kink", "unresolved")):
            store: dict[str, torch.Tensor] = getattr(result, part)
            found = estimate.get(key)
            if found is None:  # an estimate that says nothing of it: resolved
                found = torch.zeros(estimate["value"].shape, dtype=torch.bool)
            if index is None:
                store[name] = found.reshape(shape)
                continue
            have = store.get(name)
            if have is None:
                kink = key in ("kink", "unresolved")
                have = torch.full(shape, False if kink else math.nan, dtype=torch.bool if kink else torch.float64)
            flat = have.reshape(-1).clone()
            flat[index] = found
            store[name] = flat.reshape(shape)
        if index is None:
            result.checked.pop(name, None)
            continue
        if whole:
            continue
        checked = result.checked.get(name)
        flat = torch.zeros(shape.numel(), dtype=torch.bool) if checked is None else checked.reshape(-1).clone()
        flat[index] = True
        if bool(flat.all()):
            result.checked.pop(name, None)
            result.directions.pop(name, None)
        else:
            result.checked[name] = flat.reshape(shape)


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
    refusal is fn's own error, said to be a step away: fn accepts the point itself."""
    factor = 1.0
    for _ in range(NARROWINGS):
        try:
            return attempt(factor)
        except CaseTimeout:
            raise
        except CaseError:
            factor *= NARROWER
    try:
        return attempt(factor)
    except CaseError as exc:
        if exc.located:
            raise
        raise CaseError(f"{exc}, a finite-difference step from the point: {STEP_AWAY}") from exc


# Why fn can refuse a step it accepts the point of, and what to do (`_narrowed`).
STEP_AWAY = (
    "the finite differences move every differentiated input a little; an input that may not move (a label, "
    "a mask) is given as data: without requires_grad in function mode (where none requires grad, every float "
    "input is differentiated), under data= in a case file; a point at the edge of fn's domain is moved"
)
