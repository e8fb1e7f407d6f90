"""The estimate at one step, and the step that follows the function: the numerical source's
arithmetic (numerical.py asks; batches.py evaluates the loss it needs).

Per element θ the loss is evaluated at θ + t·h for t in OFFSETS (h a power of two, so every
point is exact in float64; first near RELATIVE_STEP·max(1, |θ|): `steps_for`):

- Two rounds of Richardson extrapolation of the three central differences cancel the h² and h⁴
  error terms: what is left is O(h⁶) plus rounding (`_estimates`).
- The error bar is a bound: ROUNDING_SIGMAS times the rounding the estimate carries (the
  forward's σ, measured at the point by noise.py, times the norm of the estimate's weights),
  plus the truncation predicted from the Taylor terms the six values resolve (their upper
  envelope carried on to the h⁶ term, times TRUNCATION_SAFETY: `_truncation`).
- One-sided differences give the left and right derivatives. On a smooth function the jump of
  the second differences falls as h³ (8× from h to h/2); at a kink it does not. An element
  whose jump at h/2 stands clear of rounding and has not fallen is on (or within a step of) a
  kink: the comparison then accepts any value between the left and right derivatives.
- The step follows the function (`settle`): where the truncation outweighs the rounding, the
  step shrinks to the one that balances them; where the first step was set by |θ|, the terms
  say the step is wide, or the element looks like a kink, it is estimated again at steps SHRINK
  times smaller until two steps agree within their bars, or the same kink holds at KINK_STEPS
  steps: a step wider than the function's features is taken neither for the derivative nor
  for a kink.

Computed in numpy: a few dozen operations on short vectors per batch of elements, which in
torch cost more in dispatch than in arithmetic (the arithmetic is the same: IEEE).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# The first step: a power of two near RELATIVE_STEP·max(1, |θ|). The estimate is O(h⁶) (six
# values per element, two rounds of Richardson extrapolation), so its truncation is far below
# rounding at this step for a function that varies on a scale of 1 or more; one that varies
# faster shows it (`_estimates`: the corrections decrease too slowly) and gets a smaller step.
RELATIVE_STEP = 2.0**-6
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
# A jump in the second derivative at θ (Huber's loss at a residual of exactly δ, relu(x)² at 0:
# integer data put points there) leaves an error of first order in h, which Richardson's
# extrapolation does not cancel: the central differences' corrections then fall 2× per halving of
# the step, not 4×. Where they fall by less than LINEAR_FALL (clear of rounding), the value's
# truncation is at least LINEAR_SHARE of the last correction (exact for a piecewise quadratic:
# value = f′ − 14κh/90 where D(h/2) − D(h/4) = −κh/4), times TRUNCATION_SAFETY.
LINEAR_FALL = 3.0
LINEAR_SHARE = 56 / 90
# A jump in the one-sided derivatives is a kink when it stands KINK_SIGMAS of its rounding clear.
KINK_SIGMAS = 20.0
KINK_RELATIVE = 1e-7
# The stencil: the loss at θ + t·h for each t, six values per element (and the value at θ).
OFFSETS = (1.0, 0.5, 0.25, -0.25, -0.5, -1.0)
# A step wider than the function's features looks like a kink (the one-sided derivatives
# part) or gives an estimate a smaller step disagrees with: such elements are estimated again at
# steps SHRINK times smaller, at most SHRINKS times (32⁻⁸ = 2⁻⁴⁰: from 2⁻⁶·|θ| at a Unix
# timestamp down to a spread of 1e-3), never below STEP_FLOOR_ULPS ulps of θ.
SHRINK = 1.0 / 32
SHRINKS = 8
STEP_FLOOR_ULPS = 256.0
# A kink whose one-sided derivatives moved less than this fraction of its jump when the step
# shrank 32× is a real kink (a smooth feature wider than the step moves them as the step does).
KINK_STABLE = 0.1
KINK_STEPS = 3


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
        "value": r2 + (r2 - r1) / 15, "t2": d1 - d2, "t2_half": d2 - d4, "t4": r2 - r1, "q2": q2, "s2": e1 - e2, "s4": q2 - q1,
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
            # at x ≈ 1e5): noise of ~eps·|θ·∂f/∂θ| in f, this element's own share of the measured σ,
            # with ∂f/∂θ as large as it is anywhere on the stencil: at a minimum the slope is 0 at
            # the point and not a step away (x.var() at ones: the mean's rounding moves each
            # x − mean by an ulp of 1 where x − mean is h/5, 4e-17 in the estimate, against a bar
            # of 5e-18 from the slope at the point alone).
            slope = np.maximum(np.abs(value), np.maximum(np.abs(values[0] - f0_), np.abs(values[5] - f0_)) / h_)
            own = EPS * np.abs(_array(theta)) * slope
            sigma = sigma + np.where(np.isnan(own), 0.0, own)

        def noise_of(key: str, power: int = 1) -> np.ndarray:
            return sigma * WEIGHTS[key] / h_**power

        truncation, slope_seen = _truncation(q, h_, sigma)
        last = np.abs(q["t2_half"])
        linear = (last > RESOLVED_SIGMAS * noise_of("t2_half")) & (LINEAR_FALL * last > np.abs(q["t2"]))
        truncation = np.where(linear, np.maximum(truncation, TRUNCATION_SAFETY * LINEAR_SHARE * last), truncation)
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
        # The same value within a few ulps at all six points, on both sides, and the point itself
        # off it by rounding only: flat there (a two-layer GRU at raw pixels, flat in one recurrent
        # weight, is 1.3e-13 of itself off at the point alone, computed another way there: one-sided
        # differences that grow as the step shrinks are no kink). A point further off is a jump
        # (a hinge at its margin: 1e13 ulps).
        size = EPS * np.maximum(np.abs(values).max(axis=0), np.abs(f0_))
        level = ((values.max(axis=0) - values.min(axis=0)) <= LEVEL_ULPS * size) & (np.abs(f0_ - values[0]) <= LEVEL_OFF * size)
        kink &= ~level
        left, right = np.where(level, value, left), np.where(level, value, right)
        # On a kink the derivative is the interval [left, right], not the value; no series there.
        truncation = np.where(kink, 0.0, truncation)
        error = np.where(kink, rounding, error)
        linear &= ~kink
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
        "truncation": truncation, "rounding": rounding, "flat": flat, "wide": wide, "linear": linear,
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


# Six values this many ulps apart at most are one level, and a point at most LEVEL_OFF ulps off
# it is on it, off only by its rounding (`_estimates`).
LEVEL_ULPS, LEVEL_OFF = 4.0, 4096.0


def _columns(value: torch.Tensor | np.ndarray | float, n: int) -> np.ndarray:
    """`value` (one number, or one per column) as n columns."""
    found = _array(value)
    return found if found.shape == (n,) else np.full(n, found)  # the values of np.broadcast_to, at a fifth of its cost


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
    # far (a smooth function keeps its wide step's precision). Read only where `holding`, and
    # written in the round that sets it there: kept from the first round that holds a chain.
    held: dict[str, np.ndarray] | None = None
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
        # Not where the differences converge as h (`LINEAR_FALL`): there |D(h) − D(h/2)| is only
        # twice the error of D(h/2), and the smaller step's own bar stands.
        tight = np.where(other["linear"], other["error"], np.minimum(other["error"], other["rounding"] + distance * factor**2))
        other["error"] = np.where(agree, tight, other["error"])
        # (no chain held here, the usual case: the estimates as they were)
        prior = {key: np.where(holding[where], held[key][where], was[key]) for key in was} if held is not None and holding[where].any() else was
        take = ~(settled & (prior["error"] <= other["error"]))
        for key in best:
            best[key][where] = np.where(take, other[key], prior[key])
        chain = agree & deep
        if chain.any():  # a chain held from here on
            if held is None:
                held = {key: value.copy() for key, value in best.items()}
            smaller = other["error"] < prior["error"]
            for key in best:
                held[key][where] = np.where(smaller, other[key], prior[key])
        holding[where] = chain
        gap[where] = np.where(agree | same_kink, 0.0, _finite_or(distance, math.inf))  # ±inf: ±the largest float
        pending = np.zeros_like(pending)
        # Agreeing, the smaller step's bar still mostly truncation: a smaller one may do better.
        better = settled & take & (other["truncation"] > other["rounding"]) & (other["error"] > enough_[where])
        pending[where] = ~(settled | same_kink) | better
        coarse[where] = ~(settled | same_kink)
    if held is None or not holding.any():  # no chain held at the end (the usual case)
        unsettled = (gap > 0) & ~best["kink"]
        out = {key: torch.from_numpy(best[key].copy()) for key in best}
    else:
        unsettled = (gap > 0) & ~np.where(holding, held["kink"], best["kink"])
        out = {}
        for key in best:  # a staircase's chain that agreed to the last step it could take
            out[key] = torch.from_numpy(np.where(holding, held[key], best[key]))
    out["error"] = torch.from_numpy(np.where(unsettled, np.maximum(out["error"].numpy(), gap), out["error"].numpy()))
    out["unresolved"] = torch.from_numpy(unsettled) | (out["truncation"] > out["rounding"])
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
