"""The run dtype's rounding at one point: how far a float32 gradient may honestly be off.

A fixed rtol cannot know that near a minimum a gradient is a small difference of large terms
(s = 3w − 6 at w ≈ 2), or that once tanh saturates float32 keeps two digits of 1 − tanh². So
each source is also run in float64 at the same (rounded) point, and its allowance at each
element is the larger of

- its **sensitivity**: every float input nudged by one ulp of the dtype, both ways; half the
  difference of the two float64 gradients is how rounding-sized changes move it. Real
  sensitivity is smooth, the two moves opposite; an element whose moves are not opposite jumps
  (a bug that depends on rounding, such as an argmax among ties) and gets none;
- its **own deviation** |g_dtype − g_float64|, capped at DEVIATION_CAP of the larger of
  |g_float64| and the tensor's root-mean-square gradient: what the dtype did to this very code. A derivation bug is the same in both dtypes, so this never
  excuses one; a bug that only shows through rounding can hide at most the cap.

Where UNRESOLVED_ULPS ulps of the dtype in the inputs move the float64 gradient itself by more
than the cap (a layer norm of values 1e6 ± 1e-3: the inputs vary on a scale finer than float32
holds, and its arithmetic errs by several ulps of them), the
dtype cannot compute that element at this point, rightly or wrongly: its deviation is allowed
uncapped there, the element is judged by its float64 twin alone (float64's tolerance, the same
code at the same rounded point), and the result says so in a note.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from backprop_check.dtypes import name_of
from backprop_check.errors import CaseError, CaseTimeout
from backprop_check.engine.tolerance import ERROR_BARS, FLOOR_ULPS, Tolerance
from backprop_check.model.case import Case
from backprop_check.model.forward import call_forward
from backprop_check.model.points import Point, derive_seed
from backprop_check.records import unravel
from backprop_check.sources import SOURCES, Gradients, largest_gradient
from backprop_check.sources.numerical import FiniteDifferences
from backprop_check.sources.noise import stochastic  # Monte Carlo arithmetic, shared with the referee's noise

DEVIATION_CAP = 0.05
# The dtype's arithmetic inside fn (a mean's sum, x − mean) errs by several ulps of the inputs'
# scale, not one: an element that this many ulps of the inputs move by more than the cap is
# beyond the dtype's resolution at the point.
UNRESOLVED_ULPS = 32
# Where this share of a tensor's elements is beyond the dtype's resolution, all of it is.
UNRESOLVED_SHARE = 0.5
# In float64 (float64_allowances): this many times how far a one-ulp nudge of the inputs moves
# a gradient is its rounding, up to float64's rtol of the tensor's largest gradient.
NUDGE_SPREAD = 4.0
NUDGE_CAP = 1e-7
# Where that cap binds (a formula that cancels: erfcx's 2x·erfcx(x) − 2/√π at x ≈ 1e6 keeps
# three digits of float64), the gradient at up to JITTER_MAX more points nearby (JITTER_FIRST,
# then JITTER_ROUND at a time), each input moved by up to JITTER_ULPS ulps: its mean is judged
# against the referee (to JITTER_RESOLUTION of the value), and its scatter is allowed where the
# mean agrees and the scatter is at most JITTER_CAP of the tensor's largest gradient (`_jitter`).
JITTER_FIRST, JITTER_ROUND, JITTER_MAX = 16, 64, 1024
JITTER_ULPS = 4096
JITTER_CAP = 1e-3
JITTER_RESOLUTION = 5e-5
JITTER_LEAST = 256
# Where the referee itself cannot show a slip of BLUNT of an element (its ERROR_BARS bars are
# wider, the element told from 0: dq of a saturated attention at inputs of 1e3, 4e-3 of it), no
# mean can show one of JITTER_RESOLUTION: there the draws' mean may be off the referee by its bars
# and by the scatter (rounding the jitter does not move), and the scatter is capped by JITTER_CAP
# of the point's largest gradient.
BLUNT = 1e-3
# Below float64, where the run dtype's value is off its float64 twin by more than the allowance
# above (`stochastic`): the twin again STOCHASTIC_PAIRS times with every value an op computes moved
# by a random share of the dtype's unit roundoff, each draw once each way; STOCHASTIC_SPREAD times
# how far the twin moves is the dtype's rounding of that very computation.
STOCHASTIC_SPREAD = 4.0
# Where the referee's gradient is 0 (`_flat`): this many times float64's share (eps64/eps32) of
# the source's float32 value there.
FLAT_SPREAD = 64.0
# Where that misses (`_simulated`): float64's rounding simulated at MAGNIFIED times its size,
# and SIMULATED_SPREAD times how far the source moves per unit of it allowed. The draws move each
# op's result once, where a sum rounds at every term it adds: a value made of rounding was up to
# 4x that spread in the attention below, so a wider factor than STOCHASTIC_SPREAD. A value that
# is not rounding moves by float64's rounding of itself, and 16 of that is still 4e-15 of it.
MAGNIFIED = 2.0**20
SIMULATED_SPREAD = 16.0


@dataclass(frozen=True)
class Rounding:
    """Per source ("autograd", "manual") and name: the rounding allowance of each element, and
    the source's float64 twin at the same point (a derivation bug is in the twin too, with
    float64's tiny rounding: directional checks of a large tensor see it there)."""

    allowance: dict[str, dict[str, torch.Tensor]]
    twin: dict[str, dict[str, torch.Tensor]]
    # name → (elements the dtype cannot resolve at this point, elements): judged in float64 only
    unresolved: dict[str, tuple[int, int]]
    # float64 (float64_allowances): what the jitter test allowed, one line per tensor
    notes: tuple[str, ...] = ()
    # Below float64, per source and name: float64's own rounding allowance of the twin, measured
    # as a float64 run measures it (`float64_allowances`) where a twin would otherwise fail.
    twin_allowance: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # float64 (float64_allowances): the names whose allowance the jitter test, `_flat` or
    # `_simulated` widened beyond the nudges' at some element
    widened: frozenset[str] = frozenset()

    def note(self, dtype: torch.dtype) -> str | None:
        """One line naming the elements judged by their float64 twin alone, or None."""
        if not self.unresolved:
            return None
        name = name_of(dtype)
        where = ", ".join(f"{n} of {total} elements of {k!r}" for k, (n, total) in sorted(self.unresolved.items()))
        return (
            f"{name} cannot resolve the gradient at {where} at this point: {UNRESOLVED_ULPS} {name} ulps of the "
            f"inputs move the float64 gradient there by more than {DEVIATION_CAP:.0%} (the inputs vary on a finer scale "
            f"than {name} holds), so those elements are judged by the float64 twin alone (the same code at the "
            "same rounded point, float64's tolerance)"
        )


def allowances(case: Case, point: Point, dtype: torch.dtype, gradients: dict[str, Gradients | None]) -> Rounding:
    """The rounding allowances and float64 twins of the sources in `gradients`."""
    at, nudged = nudged_points(case, point, dtype)
    result: dict[str, dict[str, torch.Tensor]] = {}
    twins: dict[str, dict[str, torch.Tensor]] = {}
    unresolved: dict[str, tuple[int, int]] = {}
    for source, grads in gradients.items():
        if grads is None:
            continue
        compute = SOURCES[source]
        base = compute(case, at, "cpu", torch.float64).values
        up, down = _nudged(lambda p, compute=compute: compute(case, p, "cpu", torch.float64).values, nudged, at.data) or (base, base)
        result[source] = {}
        twins[source] = {name: g.to(torch.float64) for name, g in base.items()}
        for name, value in grads.values.items():
            g = base.get(name)
            if g is None or any(v.get(name) is None or v[name].shape != value.shape for v in (base, up, down)):
                continue
            here = value.detach().to("cpu", torch.float64)
            allowed, beyond = allowance(here, g.to(torch.float64), up[name], down[name])
            if float(beyond.to(torch.float64).mean()) >= UNRESOLVED_SHARE:
                # Resolution is the tensor's (its inputs' offset against their spread): the few
                # elements that escaped the test did so by the chance of the nudges' signs.
                beyond = torch.ones_like(beyond)
                allowed = torch.maximum(allowed, torch.nan_to_num((here - g.to(torch.float64)).abs(), nan=0.0))
            result[source][name] = allowed
            count = int(beyond.sum())
            if count:
                unresolved[name] = (max(count, unresolved.get(name, (0, 0))[0]), g.numel())
    return Rounding(result, twins, unresolved)


def stochastic_allowances(
    case: Case, point: Point, dtype: torch.dtype, gradients: dict[str, Gradients | None], found: Rounding
) -> Rounding:
    """`found` (from `allowances`), widened where a source's value in `dtype` is off its float64
    twin by more than its allowance: there the twin's own response to `dtype`'s rounding of every
    value it computes is measured (`stochastic`), and STOCHASTIC_SPREAD times it allowed. A
    gradient that is a small difference of large terms (erfcx's 2x·erfcx(x) − 2/√π at x ≈ 1e3 in
    float32 keeps one digit: the constant alone is off by 5e-8 of 1.13) is right to be that far
    off, and the twin says so; a derivation bug is in the twin too, judged by float64's tolerance.
    Measured only where a mismatch would otherwise be reported (`check_point`); one note per
    tensor where the widening covers an element that was off. numpy code is reached through the
    arrays it is given (`arrays.Jittered`): s·(1 − s) of a sigmoid saturated in float32 is 0, its
    float64 twin 3e-10, and the twin moves by 6e-8 when s does by float32's rounding."""
    at = point.rounded(dtype)
    unit = torch.finfo(dtype).eps / 2
    allowance = {source: dict(by_name) for source, by_name in found.allowance.items()}
    notes = list(found.notes)
    for source, grads in gradients.items():
        if grads is None or source not in found.twin:
            continue
        twin, allowed = found.twin[source], allowance[source]
        off = {
            name: (grads.values[name].detach().to("cpu", torch.float64) - twin[name]).abs().nan_to_num(nan=math.inf)
            for name in allowed if name in twin
        }
        uncovered = {name: o > allowed[name] for name, o in off.items() if bool((o > allowed[name]).any())}
        if not uncovered:
            continue
        spread = stochastic(
            lambda source=source: SOURCES[source](case, at, "cpu", torch.float64).values,
            list(uncovered), unit, derive_seed("stochastic", case.name, point.label, source), numpy=case.numpy,
            decompose=True,
        )
        for name, where in uncovered.items():
            if name not in spread:
                continue
            widened = torch.maximum(allowed[name], STOCHASTIC_SPREAD * spread[name])
            covered = where & (off[name] <= widened)
            allowed[name] = widened
            if bool(covered.any()):
                what = f"the {source} gradient of {name!r} in {name_of(dtype)}, at {int(covered.sum())} of {covered.numel()} elements,"
                notes.append(cancels_note(what, dtype, cancelled_share(spread[name], twin[name], covered)))
    return replace(found, allowance=allowance, notes=tuple(notes))


# Below float64, a function that is another function in the run's dtype than in float64 (a
# constant the dtype chooses: nn.RMSNorm's eps=None is torch.finfo(dtype).eps, 1.2e-7 in float32
# and 2.2e-16 in float64): its loss off the float64 twin's by more than FORWARD_BEYOND times how
# far the dtype's rounding moves the twin's (`stochastic`). Every element of a tensor of up to
# OWN_MOST is then estimated from the dtype's own function (`own_function_allowances`), each with
# the bar of its own rounding up to OWN_ALONE of them (beyond, the bar of every input's: 4096
# elements of an RMSNorm took 40 s alone, 5 s so).
FORWARD_BEYOND = 64.0
OWN_MOST, OWN_ALONE = 4096, 256


def own_function_allowances(
    case: Case, point: Point, dtype: torch.dtype, gradients: dict[str, Gradients | None], found: Rounding,
    tol: Tolerance,
) -> Rounding:
    """`found`, widened where the run's dtype computes another function than its float64 twin.

    The float64 twin is the referee's function. Where the dtype's forward is off it by more
    than the dtype's rounding explains, the twin is no referee of the dtype's gradient at any
    element: each element of a tensor with one off its twin (up to OWN_MOST) is estimated
    again, by finite differences of the forward run in the dtype itself (`FiniteDifferences`
    with `inside`). Only where the source agrees with those estimates at every element (within
    the tolerance and ERROR_BARS bars) is its distance from the twin allowed, at the elements
    where the estimate sides with it against the twin (the twin beyond those bars). An element
    that agrees with the twin and not with the dtype's own function (a float32-only slip that
    lands on the float64 function's value) allows nothing, and a note names it. The derivation
    is still judged in float64 by the twin. Not for numpy cases and cases with nodes (their
    offsets are float64), nor for tensors beyond OWN_MOST elements."""
    if case.numpy or not found.twin:
        return found
    with torch.no_grad():
        low = float(call_forward(case, point.cast(dtype))[0].to(torch.float64))
        at = point.rounded(dtype)
        wide, tape = call_forward(case, at)
    if tape.values:
        return found
    twin_loss = float(wide.to(torch.float64))
    spread = stochastic(
        lambda: {"loss": call_forward(case, at)[0]}, ["loss"], torch.finfo(dtype).eps / 2,
        derive_seed("own function", case.name, point.label), decompose=True,
    ).get("loss")
    if spread is None or not float(spread) > 0 or not abs(low - twin_loss) > FORWARD_BEYOND * float(spread):
        return found
    allowance = {source: dict(by_name) for source, by_name in found.allowance.items()}
    off: set[str] = set()
    for source, grads in gradients.items():
        if grads is None or source not in found.twin:
            continue
        for name, allowed in allowance[source].items():
            twin = found.twin[source].get(name)
            if twin is None or twin.numel() > OWN_MOST:
                continue
            here = grads.values[name].detach().to("cpu", torch.float64)
            if bool(((here - twin).abs().nan_to_num(nan=math.inf) > allowed).any()):
                off.add(name)
    if not off:
        return found
    differences = FiniteDifferences(case, point, dtype, inside=dtype)
    notes = list(found.notes)
    kind = name_of(dtype)
    for name in sorted(off):
        size = differences.targets[name].numel()
        own = differences.estimate([name], {name: torch.arange(size)}, alone=size <= OWN_ALONE)[name]
        value, bar = own["value"], ERROR_BARS * own["error"]
        usable = torch.isfinite(value) & torch.isfinite(bar) & ~own["kink"].bool()
        for source, grads in gradients.items():
            if grads is None or name not in allowance.get(source, {}) or name not in found.twin.get(source, {}):
                continue
            here = grads.values[name].detach().to("cpu", torch.float64).reshape(-1)
            twin = found.twin[source][name].reshape(-1)
            largest = float(here.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max())
            limit = bar + tol.allowed(value, largest)
            agrees = usable & ((here - value).abs() <= limit)
            if not bool(agrees.all()):
                worst = int(torch.where(agrees, 0.0, ((here - value).abs() / limit).nan_to_num(nan=math.inf)).argmax())
                where = f"{name}[{', '.join(map(str, unravel(worst, tuple(grads.values[name].shape))))}]"
                notes.append(
                    f"{kind} computes another function than its float64 twin here (its loss is off the twin's by "
                    f"{abs(low - twin_loss):.2g}, where {kind}'s rounding moves the twin's by {float(spread):.2g}), "
                    f"and the {source} gradient disagrees with finite differences of the {kind} function itself at "
                    f"{where}: {float(here[worst]):.6g} against {float(value[worst]):.6g} ± {float(own['error'][worst]):.2g}"
                )
                continue
            sides = (twin - value).abs() > limit
            if not bool(sides.any()):
                continue
            widened = allowance[source][name].reshape(-1).clone()
            # The dtype's own gradient is within `limit` of its estimate: that far from the twin.
            widened[sides] = torch.maximum(widened[sides], (value[sides] - twin[sides]).abs() + limit[sides])
            allowance[source][name] = widened.reshape(allowance[source][name].shape)
            notes.append(
                f"{kind} computes another function than its float64 twin here (its loss is off the twin's by "
                f"{abs(low - twin_loss):.2g}, where {kind}'s rounding moves the twin's by {float(spread):.2g}: a "
                f"constant taken from the dtype, as nn.RMSNorm's eps=None takes torch.finfo(dtype).eps); the "
                f"{source} gradient of {name!r} agrees with finite differences of the {kind} function itself at every "
                f"element (to their error bars), and is allowed its distance from the twin at the {int(sides.sum())} "
                f"of {here.numel()} elements where they side with it"
            )
    return replace(found, allowance=allowance, notes=tuple(notes))


def cancelled_share(spread: torch.Tensor, twin: torch.Tensor, covered: torch.Tensor) -> float:
    """How far the simulated rounding (`stochastic`) moves the float64 twin at the `covered`
    elements, relative to the twin there: the largest."""
    return float((spread[covered] / twin[covered].abs().clamp(min=torch.finfo(torch.float64).tiny)).max())


def cancels_note(what: str, dtype: torch.dtype, share: float) -> str:
    """The note for values (`what`) that `stochastic`'s allowance covers, the twin moved by up
    to `share` of itself (`cancelled_share`)."""
    name = name_of(dtype)
    return (
        f"{what} is off its float64 twin by what {name} rounding does to that computation: the twin, with every "
        f"value it computes moved within {name}'s rounding, moves by up to {share:.1e} of itself there (a difference "
        f"of larger terms); {STOCHASTIC_SPREAD:g}x that is allowed"
    )




def float64_allowances(
    case: Case, point: Point, device: str, gradients: dict[str, Gradients | None], reference: Gradients | None = None
) -> Rounding:
    """In float64, no wider dtype can say what rounding did to a gradient; the same code at the
    point moved by an ulp of each input tensor's largest element (the resolution of the sums
    made of it), up and down, can. Per element the allowance is NUDGE_SPREAD times the larger of
    its own move and its tensor's root-mean-square move (which element a random-sign nudge moves
    least is chance), capped at float64's rtol of its tensor's largest gradient: a jump that a
    nudge crosses (a tie, a backward that reads garbage) widens nothing beyond what that tensor's
    largest element is allowed anyway. At least the floor of FLOOR_ULPS ulps of the element.
    Where it matters: an ill-conditioned gradient (pca_lowrank's order 2 moves by 4e-9 between
    points an ulp apart, and autograd is 4e-9 from the referee). Measured (two more calls of
    each source) only where a float64 check has a mismatch, to judge it again (`check_point`).
    Where the cap binds, `_jitter` may allow more, judged against the `reference`."""
    gen = torch.Generator().manual_seed(derive_seed("rounding", case.name, point.label))
    steps = {name: _scale_ulp_step(value, gen) for name, value in {**point.params, **point.data}.items()}
    nudged = [_moved(point, steps, sign) for sign in (1.0, -1.0)]
    eps = torch.finfo(torch.float64).eps
    result: dict[str, dict[str, torch.Tensor]] = {}
    notes: list[str] = []
    widened: set[str] = set()
    for source, grads in gradients.items():
        if grads is None:
            continue
        moved = _nudged(lambda p, source=source: SOURCES[source](case, p, device, torch.float64).values, nudged, point.data)  # where `gradients` ran
        if moved is None:
            moved = [grads.values, grads.values]  # no move measured: the floor alone
        result[source] = {}
        binding: dict[str, torch.Tensor] = {}
        for name, value in grads.values.items():
            if any(v.get(name) is None or v[name].shape != value.shape for v in moved) or not value.numel():
                continue
            g = torch.nan_to_num(value.detach().to("cpu", torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
            move = torch.maximum(*((v[name].to("cpu", torch.float64) - g).abs() for v in moved))
            move = torch.nan_to_num(move, nan=0.0, posinf=0.0)
            typical, scale = float(move.square().mean().sqrt()), float(g.abs().max())
            wide = NUDGE_SPREAD * move.clamp(min=typical)
            spread = wide.clamp(max=NUDGE_CAP * scale)
            if scale == 0.0:
                # Every element computed as exactly 0 leaves no largest element to bound the
                # allowance by: least squares at an exact fit (b = A·w) has a residual of 0 in
                # float64 and of an ulp of A·w in truth, and a nudge moves it by ulps of A·w,
                # rounded one way or the other. The moves are the allowance (a backward that
                # returns zeros where the truth is not moves by nothing, and still fails).
                spread = wide
            # Contiguous: `_jitter`, `_flat` and `_simulated` widen it through flat views (a
            # backward's gradient may be a permuted one, as attention's is, and so its maximum).
            result[source][name] = torch.maximum(spread, FLOOR_ULPS * eps * g.abs()).contiguous()
            if bool((wide > spread).any()):
                binding[name] = wide > spread
        if reference is None:
            continue
        nudges = {name: allowed.clone() for name, allowed in result[source].items()}
        if binding:
            values = {name: [v[name] for v in moved] for name in binding}
            notes += _jitter(case, point, device, source, grads, values, binding, reference, gen, result[source])
        notes += _flat(case, point, device, source, grads, reference, result[source])
        notes += _simulated(case, point, device, source, grads, reference, result[source])
        widened |= {name for name, allowed in result[source].items() if bool((allowed > nudges[name]).any())}
    return Rounding(result, {}, {}, tuple(notes), widened=frozenset(widened))


def _flat(
    case: Case, point: Point, device: str, source: str, grads: Gradients, reference: Gradients, allowed: dict[str, torch.Tensor]
) -> list[str]:
    """Where the referee's gradient is 0 within its bars, the source computes 0 as the rounding
    of the terms it is made of (softmax(x).sum() at x ≈ 1e6: v − Σ softmax·v, terms of |v|), and
    nothing at the point says how large those terms are. The same source in float32 rounds the
    same terms 2²⁹ times coarser: its value there says. Each such element is allowed FLAT_SPREAD
    times float64's share of the largest float32 value at any of them (eps64/eps32 of it). A
    backward that says s where the truth is 0 says about s in float32 too, and is allowed
    3e-8·s: it still fails. Once float32 has run, the same goes for any element whose referee
    value, bars and all, is below that allowance (or below FLAT_SPREAD times float64's share of
    its own float32 value), and an element float32 keeps no digit of is allowed NUDGE_SPREAD
    times float64's share of its float32 value. Nothing where the source cannot run in float32."""
    flat: dict[str, torch.Tensor] = {}
    refereed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, value in grads.values.items():
        if name not in reference.values or name not in allowed or not value.numel():
            continue
        if reference.values[name].numel() != value.numel():  # a manual gradient of the wrong shape: its own finding
            continue
        ref, bar, estimated = refereed[name] = _refereed(reference, name)
        zero = estimated & (ref.abs() <= ERROR_BARS * bar) & (value.detach().to("cpu", torch.float64).reshape(-1) != 0)
        if bool(zero.any()):
            flat[name] = zero
    if not flat:
        return []
    try:
        coarse = SOURCES[source](case, point, device, torch.float32).values
    except Exception:  # noqa: BLE001 - fn that holds tensors of its own dtype: no float32 twin
        return []
    # The largest float32 value at such elements of any input: float32 may compute one tensor's
    # zero exactly (the correlation of two values), and the point's terms are the same terms.
    terms = max(
        (float(coarse[name].detach().to("cpu", torch.float64).reshape(-1)[zero].abs().nan_to_num(0.0, posinf=0.0).max())
         for name, zero in flat.items() if coarse.get(name) is not None and coarse[name].numel() == zero.numel()),
        default=0.0,
    )
    if terms == 0.0:
        return []
    share = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    covered, cancelled = {}, {}
    for name, (ref, bar, estimated) in refereed.items():
        # The elements whose true gradient, bars and all, is below that rounding too, or below
        # float64's share of their own float32 value (which is then that much larger than the
        # truth: the rounding of terms that cancel), as least squares at its fit has it: the
        # residual is the rounding of A·w − b, and so is every gradient (2.9e-11 ± 2.4e-12 where
        # float64 rounds the terms to 6.6e-8). No float64 computation resolves them at this point;
        # a backward that says s where the truth is smaller says about s in float32 too, and is
        # allowed 1.2e-7·s.
        low = coarse.get(name)
        value = grads.values[name].detach().to("cpu", torch.float64).reshape(-1)
        own = (
            low.detach().to("cpu", torch.float64).reshape(-1).abs().nan_to_num(0.0, posinf=0.0)
            if low is not None and low.numel() == ref.numel() else torch.zeros_like(ref)
        )
        rounded = FLAT_SPREAD * share * torch.clamp(own, min=terms)
        zero = flat.get(name, torch.zeros_like(estimated))
        below = zero | (estimated & (ref.abs() + ERROR_BARS * bar <= rounded))
        # Elsewhere, where float32 keeps no digit of the element (off its float64 value by half
        # its own or more: the same terms cancel), float64 rounds them by its share of that value:
        # NUDGE_SPREAD times it is allowed (least squares a hair off its fit, w + 1e-13: 4.4e-13
        # at an element of 2e-10 whose float32 value is 2.2e-4).
        lost = estimated & ~below & ((own - value.abs()).abs() >= own / 2) & (own > 0)
        widened = allowed[name].reshape(-1)
        widened[below] = torch.maximum(widened[below], rounded[below])
        widened[lost] = torch.maximum(widened[lost], NUDGE_SPREAD * share * own[lost])
        # Said where it lets a value pass: a value the allowance does not cover is a finding.
        covered[name] = int((below & (value.abs() <= widened)).sum())
        cancelled[name] = int((lost & ((value - ref).abs() <= widened)).sum())
    counts = ", ".join(f"{count} of {refereed[name][0].numel()} elements of {name!r}" for name, count in covered.items() if count)
    notes = []
    if counts:
        notes.append(
            f"the referee's gradient is 0 within its bars (or below the allowance) at {counts}, where the {source} "
            f"gradient is taken for the rounding of the terms it is made of: {FLAT_SPREAD:g}x float64's share "
            f"({share:.1e}) of its value computed in float32 there (at least {terms:.1e}) is allowed"
        )
    lost_counts = ", ".join(f"{count} of {refereed[name][0].numel()} elements of {name!r}" for name, count in cancelled.items() if count)
    if lost_counts:
        notes.append(
            f"float32 keeps no digit of the {source} gradient at {lost_counts} (its terms cancel): "
            f"{NUDGE_SPREAD:g}x float64's share ({share:.1e}) of its float32 value is allowed there for float64's rounding"
        )
    return notes


def _simulated(
    case: Case, point: Point, device: str, source: str, grads: Gradients, reference: Gradients, allowed: dict[str, torch.Tensor]
) -> list[str]:
    """Where the referee's gradient is 0 within its bars and the source's value is still beyond
    its allowance, how far float64's own rounding moves the source there, simulated: every
    value the source computes (forward and backward) moved by a random share of MAGNIFIED times
    float64's unit roundoff (`stochastic`), its spread divided by MAGNIFIED. Magnified, the draws
    outweigh the rounding of the draws themselves, and a computation that merely rounds answers
    them in proportion (a causal attention at inputs of 1e3 saturates its softmax, and its
    backward's dP − Σ dO∘O cancels terms of 4e3 to 2e-10: it moves by 1.2e-10 a unit, at 2¹⁰,
    2²⁰ and 2³⁰ alike). SIMULATED_SPREAD times that is allowed. Where float32 says nothing
    (`_flat`: a source that runs in float64 only), this still does. Ops are drawn whole, not
    decomposed: float64's own kernels are the ones whose rounding is measured. A value made of
    rounding moves by about itself; a backward that says s where the truth is 0, s not a
    rounding, moves by float64's rounding of s and still fails. Only where the truth is 0:
    elsewhere a slip as large as the rounding hides in it (erfcx at 1e6)."""
    uncovered: dict[str, torch.Tensor] = {}
    for name, value in grads.values.items():
        if name not in reference.values or name not in allowed or reference.values[name].numel() != value.numel():
            continue
        ref, bar, estimated = _refereed(reference, name)
        flat = value.detach().to("cpu", torch.float64).reshape(-1).abs()
        over = estimated & (ref.abs() <= ERROR_BARS * bar) & (flat > allowed[name].reshape(-1))
        if bool(over.any()):
            uncovered[name] = over
    if not uncovered:
        return []
    unit = MAGNIFIED * torch.finfo(torch.float64).eps / 2
    spread = stochastic(
        lambda: SOURCES[source](case, point, device, torch.float64).values, list(uncovered), unit,
        derive_seed("simulated", case.name, point.label, source), numpy=case.numpy,
    )
    counts, moves = [], []
    for name, over in uncovered.items():
        if name not in spread:
            continue
        value = grads.values[name].detach().to("cpu", torch.float64).reshape(-1).abs()
        widened = allowed[name].reshape(-1)
        move = spread[name].reshape(-1) / MAGNIFIED
        widened[over] = torch.maximum(widened[over], SIMULATED_SPREAD * move[over])
        covered = over & (value <= widened)
        if bool(covered.any()):
            counts.append(f"{int(covered.sum())} of {value.numel()} elements of {name!r}")
            moves.append(float(move[covered].max()))
    if not counts:
        return []
    return [
        f"the referee's gradient is 0 within its bars at {', '.join(counts)}, where the {source} gradient is the rounding "
        f"of terms that cancel: with every value it computes moved within 2^{round(math.log2(MAGNIFIED))} times "
        f"float64's rounding, it moves in proportion, by up to {max(moves):.1e} per unit of float64's rounding; "
        f"{SIMULATED_SPREAD:g}x that is allowed"
    ]


def jittered(point: Point, gen: torch.Generator) -> Point:
    """`point` with every float input moved by a random whole number of ulps of its tensor's
    largest element, up to JITTER_ULPS each way (random signs)."""
    steps = {
        name: _scale_ulp_step(value, gen) * torch.randint(1, JITTER_ULPS + 1, value.shape, generator=gen, dtype=torch.float64)
        if value.is_floating_point() and value.numel() else torch.zeros(())
        for name, value in {**point.params, **point.data}.items()
    }
    return _moved(point, steps, 1.0)


def scattered(
    judged: dict[str, dict[str, torch.Tensor]], draws: dict[str, list[torch.Tensor]], draw: Callable[[], dict[str, torch.Tensor] | None],
    largest: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The jitter test (`_jitter`) of flat values against a referee: `judged[name]` holds "ref",
    "bar", the elements still "open" and those "taken" (updated in place), `draws[name]` the
    values in hand, the value at the point first; `draw()` one more of each at a fresh point
    (`jittered`), None to stop; `largest`: the point's largest gradient, which caps the scatter
    where the referee is blunt (`_blunt`; 0: the tensor's own). The draws' spread per name, for
    what was taken."""
    eps = torch.finfo(torch.float64).eps
    spreads: dict[str, torch.Tensor] = {}
    size = JITTER_FIRST  # garbage and slips are told at once; rounding needs the draws to add up
    while any(bool(j["open"].any()) for j in judged.values()) and len(next(iter(draws.values()))) < JITTER_MAX:
        for _ in range(size):
            there = draw()
            if there is None:  # the source changed shape, or failed, at a nudged point: nothing is taken
                for j in judged.values():
                    j["taken"].zero_()
                return {}
            for name in draws:
                draws[name].append(there[name].detach().to("cpu", torch.float64).reshape(-1))
        for name, j in judged.items():
            stack = torch.stack(draws[name])
            value, mean, spread = stack[0], stack.mean(0), stack.std(0)
            scale = float(value.abs().nan_to_num(0.0).max())
            floor = NUDGE_CAP * scale + FLOOR_ULPS * eps * j["ref"].abs()
            standard = spread / len(draws[name]) ** 0.5
            off = (mean - j["ref"]).abs()
            blunt = _blunt(j["ref"], j["bar"])
            cap = torch.full_like(spread, JITTER_CAP * scale).masked_fill(blunt, JITTER_CAP * max(scale, largest))
            rounding = (spread > 0) & (spread <= cap) & torch.isfinite(stack).all(0)
            # Where the referee is blunt the jitter may not move every rounding an element is made
            # of (a softmax's 1 − 2e-9 keeps its last bits over 4096 ulps of its inputs): its mean
            # may be off the truth by up to its scatter, as its value at the point may.
            agrees = off <= ERROR_BARS * (standard + j["bar"]) + floor + torch.where(blunt, spread, 0.0)
            near = (value - j["ref"]).abs() <= NUDGE_SPREAD * spread + ERROR_BARS * j["bar"] + floor
            # Not before JITTER_LEAST draws: a value that jumps now and then (a slip that lands on
            # whichever of equal elements is largest, and moves as a nudge breaks the tie) has a
            # mean off by the share of draws it jumps in, which fewer draws cannot tell.
            # The referee's own bar counts too: where it cannot show a slip of JITTER_RESOLUTION
            # (logsumexp(x/1e-3) at x ≈ 1e6, whose forward keeps seven digits), neither can the mean.
            # Where it cannot show one of BLUNT, the mean need only be as sharp as its bar and the
            # scatter it may be off by (`agrees`).
            room = torch.where(blunt, ERROR_BARS * j["bar"] + spread, JITTER_RESOLUTION * j["ref"].abs() - ERROR_BARS * j["bar"])
            resolved = (ERROR_BARS * standard <= room) & (len(draws[name]) >= JITTER_LEAST)
            # the draws it would take to resolve: beyond JITTER_MAX (or no room at all), none are drawn for it
            needed = torch.where(room > 0, (ERROR_BARS * spread / room.clamp(min=torch.finfo(torch.float64).tiny)).square(), math.inf)
            j["taken"] |= j["open"] & rounding & agrees & near & resolved
            j["open"] &= rounding & agrees & near & ~resolved & (needed <= JITTER_MAX)  # still to decide: more draws
            spreads[name] = spread
        size = JITTER_ROUND
    return spreads


def _blunt(ref: torch.Tensor, bar: torch.Tensor) -> torch.Tensor:
    """The elements the referee tells from 0 but cannot show a slip of BLUNT of."""
    return (ERROR_BARS * bar > BLUNT * ref.abs()) & (ref.abs() > ERROR_BARS * bar)


def _refereed(reference: Gradients, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The referee's flat values of `name`, their error bars, and which elements it estimated."""
    ref = reference.values[name].detach().to("cpu", torch.float64).reshape(-1)
    bar = reference.error[name].detach().to("cpu", torch.float64).reshape(-1) if name in reference.error else torch.zeros_like(ref)
    mask = reference.checked.get(name)
    estimated = torch.ones_like(ref, dtype=torch.bool) if mask is None else mask.reshape(-1).to("cpu", torch.bool)
    return ref, bar, estimated


def _jitter(
    case: Case, point: Point, device: str, source: str, grads: Gradients, moved: dict[str, list[torch.Tensor]],
    binding: dict[str, torch.Tensor], reference: Gradients, gen: torch.Generator, allowed: dict[str, torch.Tensor],
) -> list[str]:
    """Where NUDGE_CAP binds, the source at more points nearby (JITTER_FIRST, then JITTER_ROUND
    at a time, while an element is undecided), every input moved by a random whole number of
    ulps of its tensor's largest element, up to JITTER_ULPS each way. A gradient whose float64
    evaluation only rounds scatters around its true value (which hardly moves over so few ulps,
    and evenly both ways), so the mean of the draws estimates it, with a standard error that
    falls as they add up. An element is allowed NUDGE_SPREAD times its scatter once that mean
    agrees with the referee within ERROR_BARS of its standard error (and the referee's bar),
    that standard error is small enough to show a slip of JITTER_RESOLUTION of the value, the
    value itself lies within NUDGE_SPREAD of the scatter, and the scatter is at most JITTER_CAP
    of the tensor's largest gradient. Where the referee cannot show a slip of BLUNT of the
    value (`_blunt`), the mean need only agree within the referee's bars and the scatter (the
    jitter may leave some rounding the element is made of unmoved), and the scatter is capped by
    JITTER_CAP of the point's largest gradient: a slip beyond those still moves the mean out. A
    backward that reads garbage scatters around no value, or by more than that, and is told in
    the first round; a slip moves the mean. Undecided
    after JITTER_MAX draws, an element keeps the capped allowance. `allowed` is widened in
    place; one note per tensor widened."""
    judged: dict[str, dict[str, torch.Tensor]] = {}
    for name, where in binding.items():
        if name not in reference.values or reference.values[name].numel() != grads.values[name].numel():
            continue  # a manual gradient of the wrong shape is a finding of its own
        ref, bar, estimated = _refereed(reference, name)
        judged[name] = {"ref": ref, "bar": bar, "open": where.reshape(-1) & estimated, "taken": torch.zeros_like(estimated)}
    draws = {name: [t.detach().to("cpu", torch.float64).reshape(-1) for t in (grads.values[name], *moved[name])] for name in judged}

    def draw() -> dict[str, torch.Tensor] | None:
        try:
            there = SOURCES[source](case, jittered(point, gen), device, torch.float64).values
        except CaseTimeout:
            raise
        except CaseError:  # fn refuses a point a few ulps away: nothing is taken, the mismatch stands
            return None
        if any(there.get(name) is None or there[name].shape != grads.values[name].shape for name in draws):
            return None
        return {name: there[name] for name in draws}

    spreads = scattered(judged, draws, draw, largest_gradient(grads, list(grads.values)))
    eps = torch.finfo(torch.float64).eps
    notes = []
    for name, j in judged.items():
        taken = j["taken"]
        if not bool(taken.any()):
            continue
        flat, spread = allowed[name].reshape(-1), spreads[name]
        flat[taken] = torch.maximum(flat[taken], NUDGE_SPREAD * spread[taken])
        relative = float((spread[taken] / j["ref"][taken].abs()).max())
        shape = tuple(allowed[name].shape)
        at = [f"{name}[{', '.join(map(str, unravel(i, shape)))}]" for i in taken.nonzero().reshape(-1)[:4].tolist()]
        shown = ", ".join(at) + (", …" if int(taken.sum()) > len(at) else "")
        notes.append(
            f"the {source} gradient of {name!r} at {int(taken.sum())} of {taken.numel()} elements ({shown}) scatters by up to "
            f"{relative:.1e} of itself between points a few ulps apart (a formula that cancels: float64 keeps about "
            f"{max(0, round(-math.log10(max(relative, eps))))} digits of it there); its mean over "
            f"{len(draws[name])} such points agrees with the referee within {JITTER_RESOLUTION:g} of the value"
            + (f" (within the referee's bars and the scatter where those bars are wider than {BLUNT:g} of it)" if bool((taken & _blunt(j["ref"], j["bar"])).any()) else "")
            + f", so the difference is rounding, allowed there ({NUDGE_SPREAD:g}x that scatter)"
        )
    return notes


def nudged_points(case: Case, point: Point, dtype: torch.dtype) -> tuple[Point, list[Point]]:
    """The point as `dtype` holds it (in float64), and the same with every float input moved by
    one ulp of `dtype` with a random sign, up and down: where a float64 twin is computed."""
    at = point.rounded(dtype)
    gen = torch.Generator().manual_seed(derive_seed("rounding", case.name, point.label))
    steps = {name: _ulp_step(value, dtype, gen) for name, value in {**at.params, **at.data}.items()}
    return at, [_moved(at, steps, sign) for sign in (1.0, -1.0)]


def allowance(
    here: torch.Tensor, g: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element of a value computed in the run's dtype (`here`, as float64), given its float64
    twin `g` at the same point and at the point nudged up and down: the rounding allowance (the
    larger of the sensitivity and the capped own deviation), and the elements beyond the
    dtype's resolution (their deviation uncapped). The module docstring says why each part."""
    up, down = up.to(torch.float64), down.to(torch.float64)
    odd = (up - down).abs() / 2
    even = (up + down - 2 * g).abs()
    smooth = even <= odd / 2 + 64 * torch.finfo(torch.float64).eps * g.abs()
    sensitivity = torch.where(smooth, odd, torch.zeros_like(odd))
    # The cap is relative to the tensor's own size (its root-mean-square value), not to each
    # element: float32 loses digits relative to the terms a gradient is made of, so an element
    # that is small next to its neighbours (layer norm at x ≈ 1e3) can be off by more than 5 %
    # of itself and be correct code.
    typical = g.square().mean().sqrt() if g.numel() else g.abs()
    cap = DEVIATION_CAP * torch.maximum(g.abs(), typical)
    beyond = UNRESOLVED_ULPS * torch.maximum((up - g).abs(), (down - g).abs()) > cap
    deviation = torch.where(beyond, (here - g).abs(), torch.minimum((here - g).abs(), cap))
    return torch.nan_to_num(torch.maximum(sensitivity, deviation), nan=0.0), beyond


def _moved(point: Point, steps: dict[str, torch.Tensor], sign: float) -> Point:
    return replace(
        point,
        params={k: v + sign * steps[k] for k, v in point.params.items()},
        data={k: v + sign * steps[k] if v.is_floating_point() else v for k, v in point.data.items()},
    )


def _nudged(
    evaluate: Callable[[Point], dict[str, torch.Tensor]], nudged: list[Point], data: dict[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]] | None:
    """`evaluate` at the `nudged` points; where fn refuses its data an ulp away (a 0/1 label that a
    distribution validates: Bernoulli's log_prob), at the same points with the unmoved `data`;
    None where it refuses those too (no move is measured then)."""
    for points in (nudged, [replace(p, data=data) for p in nudged]):
        try:
            return [evaluate(p) for p in points]
        except CaseError:
            continue
    return None


def _scale_ulp_step(value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One float64 ulp of the tensor's largest |element| for every element, with a random sign:
    the resolution of the sums a gradient of that tensor is made of (x − max at x ≈ 1e4 errs by
    an ulp of 1e4, whatever the element, 0 included)."""
    if not value.is_floating_point() or not value.numel():
        return torch.zeros(())
    finite = value.detach()[torch.isfinite(value.detach())]
    top = finite.abs().max().to(torch.float64) if finite.numel() else torch.zeros((), dtype=torch.float64)
    ulp = torch.nextafter(top, torch.tensor(torch.inf, dtype=torch.float64)) - top
    return ulp * (torch.randint(0, 2, value.shape, generator=gen, dtype=torch.float64) * 2 - 1)


def _ulp_step(value: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """One `dtype` ulp per float element, with a random sign (zero for integer data)."""
    if not value.is_floating_point():
        return torch.zeros(())
    low = value.to(dtype)
    ulp = (torch.nextafter(low, torch.full_like(low, torch.inf)) - low).to(torch.float64)
    return ulp * (torch.randint(0, 2, value.shape, generator=gen, dtype=torch.float64) * 2 - 1)
