"""The forward's own rounding at the point, measured: the σ every error bar is built from.

The loss is evaluated along NOISE_LINES lines through the point, NOISE_POINTS points NOISE_ULPS
ulps of every input apart; the NOISE_ORDER-th differences there are rounding alone (ECnoise,
Moré and Wild, 2011: `_noise_of`). Elements below NOISE_WIDE_SCALE also move on wide lines,
whose σ counts where their differences pass ECnoise's test (`_wide_noise`). A loss that stands
still on the lines gets its σ from float64's simulated rounding of every value its forward
computes (Monte Carlo arithmetic: `stochastic`), or from the sizes of the terms it sums
(`terms_scale`); and where it still stands still when every input moves by STAIR_MOVE of
itself, it is a staircase of its own (`_stair_rows`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch._decomp import decomposition_table  # loaded with torch: no start-up cost
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from backprop_check.errors import CaseTimeout
from backprop_check.model.arrays import Jittered
from backprop_check.sources.batches import Batched, Flat, _Probes
from backprop_check.sources.inplace import InPlace
from backprop_check.sources.stencil import EPS, ROUNDING_FLOOR, _array

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
# A loss that stands still on the noise lines is a staircase of its own (a quantizer: ceil,
# round(x·256)/256) where it still stands still when every input moves by this much of itself;
# a smooth function computed in float32 (x.float()) is a staircase too, of float32's rounding
# (2⁻²⁴ of the value), finer than this: read at wide steps, as any smooth function.
STAIR_MOVE = 2.0**-20
# A loss that stands still there may still be smooth, computed at a coarser rounding than its
# own ulp: a cross-entropy of 2e-9 read as lse − x_t at x_t = 20 rounds at the ulp of 20, whose
# stairs a move of STAIR_MOVE·max(1, |θ|) does not cross where the gradient is 2e-9; so does a
# float32 value inside a float64 forward. Where it stands still, the element moves on, STAIR_GROW
# times further each time, STAIR_GROWS times, and the first change of the loss is the height of
# its stairs: no more than STAIR_ROUNDING ulps of the coarsest value the forward computes (its
# largest |v|·eps of v's dtype), it is rounding, whose σ it gives (`rounding_stairs`); more, a
# staircase of its own (a quantizer: round(x, 3) moves by 1e-3, 2⁴⁰ ulps of 1).
STAIR_GROW = 4.0
STAIR_GROWS = 6
STAIR_ROUNDING = 1024.0


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
    """Records the largest finite magnitude of every floating-point value an op makes, and the
    largest ulp among them (|v|·eps of v's own dtype: a float32 value rounds 2²⁹ times coarser)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0.0
        self.coarsest = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if readable_values(value):
                largest = float(_finite_abs(value).max())
                self.largest = max(self.largest, largest)
                eps = torch.finfo(value.dtype if value.is_floating_point() else value.real.dtype).eps
                self.coarsest = max(self.coarsest, largest * eps)
        return out


def _traced(call: Callable[[], object] | None) -> _Terms:
    """`_Terms` of one plain forward pass of `call`, as far as it gets (None: no pass)."""
    terms = _Terms()
    if call is not None:
        try:
            with torch.no_grad(), terms:
                call()
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - what the trace cannot follow: the values seen before it
            pass
    return terms


def term_scales(call: Callable[[], object] | None, *inputs: torch.Tensor) -> tuple[float, float]:
    """From one traced forward pass (`_traced`): the largest finite magnitude among `inputs` and
    the values `call` computes (`terms_scale`), and the largest ulp among them (|v|·eps of v's
    dtype, `inputs` as float64): the coarsest rounding any value of the forward suffers."""
    terms = _traced(call)
    given = [float(_finite_abs(t).max()) for t in inputs if t.numel()]
    return max([terms.largest, *given]), max([terms.coarsest, *(value * EPS for value in given)])


def rounding_stairs(jumps: torch.Tensor, coarsest: float) -> torch.Tensor:
    """Per element, whether the first change of a loss that stood still (`jumps`, its height;
    inf where it never changed) is a stair of rounding: at most STAIR_ROUNDING of the coarsest
    ulp the forward computes."""
    return jumps <= STAIR_ROUNDING * coarsest


def stochastic(
    compute: Callable[[], dict[str, torch.Tensor]], names: list[str], unit: float, seed: int, numpy: bool = False,
    decompose: bool = False,
) -> dict[str, torch.Tensor]:
    """Per name in `names`, how far the float64 values `compute()` gives for it move when every
    floating-point value an op makes is multiplied by 1 + δ, δ uniform within ±`unit` (Monte
    Carlo arithmetic: a dtype's rounding, simulated in float64). STOCHASTIC_PAIRS draws,
    each applied both ways: a computation that merely rounds responds to them linearly, the two
    moves opposite; an element whose moves are not opposite in every pair jumps (a branch, a tie
    that the draws break) and gets 0, as a jump is no rounding. {} where `compute` fails under
    the draws (nothing is allowed then). `numpy`: `compute` runs numpy code, whose ufuncs the
    draws reach through the arrays it is given (`arrays.Jittered`), not torch's dispatch.
    `decompose`: a fused op with a decomposition runs as its decomposition, so that the values
    computed inside it are drawn too (torch's cross-entropy backward forms softmax − onehot in
    one op: at p ≈ 1 − 3e-8 its float32 result is 0, and only the rounding of p shows why)."""
    rounds = Jittered if numpy else functools.partial(_Rounds, decompose=decompose)
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
                with rounds(unit * sign, seed + pair):
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
    """Every floating-point value an op computes (not a view of another) multiplied by 1 + δ, δ
    uniform within ±`unit`, drawn from a generator seeded with `seed`: the same draws in the same
    order for -`unit`, so two runs move the values opposite ways. A value an op writes in place or
    into out= is moved where it is written (a fused RNN's cell computes its gates with sigmoid_
    and tanh_: float32's sigmoid of 17 is exactly 1, and only its moved result shows why the
    gradient there is 0); an op that changes only a tensor's shape or strides (transpose_) is
    left whole."""

    def __init__(self, unit: float, seed: int, decompose: bool = False) -> None:
        super().__init__()
        self.unit = unit
        self.gen = torch.Generator().manual_seed(seed)
        self.decompose = decompose
        self.decomposing: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        # A functional op only (one that writes in place or into out= is left whole), and not
        # inside its own decomposition (one that falls back on the op it decomposes).
        decomposition = decomposition_table.get(func) if self.decompose and func not in self.decomposing else None
        if decomposition is not None and not func.is_view and not func._schema.is_mutable:
            self.decomposing.add(func)
            try:
                with self:  # the ops it is made of come here again, each drawn
                    found = decomposition(*args, **(kwargs or {}))
            except Exception:  # noqa: BLE001 - no decomposition for these arguments: the op itself
                found = NotImplemented
            finally:
                self.decomposing.discard(func)
            if found is not NotImplemented:
                return found
        out = func(*args, **(kwargs or {}))
        if func.is_view or torch.Tag.inplace_view in func.tags:
            return out
        returns = func._schema.returns
        if not any(r.alias_info is not None for r in returns):
            return tree_map(self._rounded, out)
        written = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for r, value in zip(returns, written):
            if r.alias_info is not None and r.alias_info.is_write and readable_values(value):
                self._rounded_in_place(value)
        return out

    def _rounded(self, value: object) -> object:
        if not readable_values(value):  # an integer, an empty tensor, a ZeroTensor's exact zeros
            return value
        assert isinstance(value, torch.Tensor)
        return value * self._factor(value)

    def _rounded_in_place(self, value: torch.Tensor) -> None:
        factor = self._factor(value)
        try:
            value.mul_(factor)
        except RuntimeError:  # elements that share memory (stride 0): written once, left as written
            pass

    def _factor(self, value: torch.Tensor) -> torch.Tensor:
        """1 + δ per element of `value`, in its real dtype and on its device."""
        real = value.real.dtype if value.is_complex() else value.dtype
        delta = (torch.rand(value.shape, generator=self.gen, dtype=torch.float64) * 2 - 1) * self.unit
        return (1 + delta).to(value.device, real)


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
    return term_scales(call, *inputs)[0]


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
    # the point, then each line's values (np.concatenate of a broadcast f0 and the lines, filled in place)
    differences = np.empty((NOISE_LINES, NOISE_POINTS, lines.shape[2]), dtype=np.result_type(f0, lines))
    differences[:, 0, :] = f0.reshape(1, -1)
    differences[:, 1:, :] = lines
    for _ in range(NOISE_ORDER):
        differences = differences[:, 1:] - differences[:, :-1]
    return differences**2 / math.comb(2 * NOISE_ORDER, NOISE_ORDER)
