"""Guards: what makes a case unusable at a point, said in one line.

A forward pass that changes its inputs or gives a different loss twice at the same point
(dropout, unseeded randomness), a loss or a reference gradient that is not finite, a case with
nothing to differentiate: each is a broken case (`error`), not a noisy mismatch.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch

from backprop_check.errors import CaseError, CaseTimeout
from backprop_check.model.case import Case
from backprop_check.model.forward import call_forward
from backprop_check.model.nodes import Tape
from backprop_check.model.points import Point, given_point, random_point, with_data, within_given
from backprop_check.sources import Gradients
from backprop_check.records import unravel


class NonFiniteLoss(CaseError):
    """The loss is NaN or infinite at a point; `value` is that loss."""

    def __init__(self, message: str, value: float) -> None:
        super().__init__(message)
        self.value = value


def require_finite_loss(loss: torch.Tensor | None, point: Point, case: Case | None = None) -> None:
    """A CaseError where `loss` is NaN or infinite at `point`. For a function check (`case` with
    cotangents) the loss is fn's outputs summed against random grad_outputs, whose sign is theirs
    and not fn's: the message names fn's outputs."""
    if loss is None:
        return
    # A real loss (every loss here) read as a Python float: the same test, a fraction of the
    # cost of torch.isfinite's composite on one element.
    finite = math.isfinite(float(loss)) if loss.dtype.is_floating_point and loss.numel() == 1 else bool(torch.isfinite(loss))
    if not finite:
        hint = "" if point.seed is None else f"; {point.constrain_hint()}"
        said = f"the loss is {float(loss)} at the {point.describe()}"
        if getattr(case, "cotangents", None):  # fn(+inf) summed against a negative grad_output is -inf
            said = f"fn's outputs are not finite at the {point.describe()} (their sum against random grad_outputs is {float(loss)})"
        error = NonFiniteLoss(f"{said}{hint}", float(loss))
        error.located = True
        raise error


def require_finite_gradient(numerical: Gradients, point: Point) -> None:
    """The float64 referee must be finite wherever it was estimated; a NaN or Inf there means
    the loss is not finite a finite-difference step away (the edge of its domain), and no
    gradient at this point can be checked."""
    for name, value in numerical.values.items():
        bad = ~torch.isfinite(value)
        if name in numerical.checked:
            bad &= numerical.checked[name]
        if bool(bad.any()):
            index = unravel(int(bad.reshape(-1).nonzero()[0, 0]), tuple(bad.shape))
            label = f"{name}[{', '.join(map(str, index))}]" if index else name
            hint = point.constrain_hint()
            error = CaseError(
                f"the numerical gradient of {label} is {float(value[index])} at the {point.describe()}: "
                f"the loss is not finite a small step away from it (the edge of its domain, like sqrt or log at 0?); {hint}"
            )
            error.located = True
            raise error


Judged = TypeVar("Judged")
DOMAIN_NOTE = (
    "random points: the forward is not finite (or raises) at standard normal values, outside its domain, "
    "so they are drawn within the range of the given values (sample= chooses them)"
)


def random_in_domain(
    case: Case, given: Point, index: int, seed: int, attempt: int, judge: Callable[[Point], Judged]
) -> tuple[Point, Judged, str | None]:
    """Random point `index` and `judge` of it (which raises CaseError where the forward is not
    finite there). Where a standard normal point is outside the forward's domain (log, sqrt, a
    probability) and the given point inside it, the point is drawn within the given values'
    range instead (`within_given`), with DOMAIN_NOTE; where that fails too, the first error."""
    try:
        point = random_point(case, given, index, seed, attempt)
        return point, judge(point), None
    except CaseTimeout:
        raise
    except CaseError as exc:
        inside = within_given(case, given, index, seed, attempt)
        if inside is None:
            raise exc.at(f"random point {index}") from exc
        try:
            return inside, judge(inside), DOMAIN_NOTE
        except CaseTimeout:
            raise
        except CaseError:
            raise exc.at(f"random point {index}") from exc


def finite_forward(case: Case, point: Point) -> None:
    """The forward at `point` runs and its loss is finite (forward mode's random points)."""
    with torch.no_grad():
        loss, _ = call_forward(case, point)
    require_finite_loss(loss, point, case)


def checked_given(case: Case, seed: int) -> tuple[Point, list[str]]:
    """The given point of run `seed` once the guards every mode needs have passed (the forward
    is pure, not every parameter is empty, integer scalars that are numbers become floats),
    with the notes they leave."""
    given = given_point(case, seed)
    notes = empty_parameters(given)
    check_forward_is_pure(case, given)
    given, fixed = numbers_among_integers(case, given)
    # what the case itself left out or did differently (a function check's outputs, its dtypes)
    own = [note for note in getattr(case, "notes", ()) if note not in notes]
    return given, notes + list(fixed) + own


def empty_parameters(given: Point) -> list[str]:
    """Notes on parameters with no elements; a case whose every parameter is empty checks
    nothing, and an `ok` for it would be a lie."""
    empty = [f"{name!r} has shape {tuple(value.shape)}" for name, value in given.params.items() if value.numel() == 0]
    if empty and len(empty) == len(given.params):
        raise CaseError(f"every parameter is empty ({', '.join(empty)}): there is no gradient to check")
    return [f"parameter {text}: it has no elements to check" for text in empty]


def check_forward_is_pure(case: Case, point: Point, runs: int = 3) -> None:
    """The forward pass must be deterministic and leave its inputs alone: it is run `runs`
    times at the same point, and the loss and every node must come out the same each time
    (dropout can give an equal loss twice by chance; rarely three times, never at every node)."""
    outputs, changed = [], None
    for _ in range(runs):
        found, changed = _on_copies(case, point)
        if changed is not None:
            raise CaseError(f"the forward pass changes {changed!r} in place; it must not modify its inputs")
        outputs.append(found)
    first, tape = outputs[0]
    require_finite_loss(first, point, case)
    for loss, other in outputs[1:]:
        differs = [k for k, v in tape.values.items() if k in other.values and not identical(v, other.values[k])]
        if not torch.equal(first, loss) or differs:
            where = f"node {differs[0]!r}" if differs and torch.equal(first, loss) else "the loss"
            raise CaseError(
                f"the forward pass is not deterministic: {where} differs between two runs at the same point "
                f"(loss {float(first):.17g} and {float(loss):.17g}; dropout or unseeded randomness, or state the "
                "forward updates each run: a module in train mode whose buffers move, such as spectral_norm's power "
                "iteration; eval() holds them)"
            )


def leaves_inputs_alone(case: Case, point: Point, dtype: torch.dtype) -> None:
    """Below float64, the forward in `dtype` leaves its inputs alone too: an op that copies an
    input in float64 returns the input itself in its own dtype (`logits.float()` in float32:
    Megatron's cross-entropy then writes its softmax into the caller's logits), which the
    float64 purity check cannot see."""
    _, changed = _on_copies(case, point.cast(dtype))
    if changed is not None:
        raise CaseError(
            f"the forward pass changes {changed!r} in place in {str(dtype).removeprefix('torch.')} (an op that copies "
            f"it in float64, such as .float(), returns it itself there); it must not modify its inputs"
        )


def _on_copies(case: Case, at: Point) -> tuple[tuple[torch.Tensor, Tape], str | None]:
    """The forward at `at`, run on copies of its values, and the first value it changed in place
    (None: none). NaN data (missing values) are the same NaN after it."""
    params = {k: v.clone() for k, v in at.params.items()}
    data = {k: v.clone() for k, v in at.data.items()}
    with torch.no_grad():
        found = call_forward(case, replace(at, params=params, data=data))
    changed = (name for name, value in {**params, **data}.items() if not identical(value, at.params.get(name, at.data.get(name))))
    return found, next(changed, None)


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape and the same values, NaN where the other has NaN."""
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def numbers_among_integers(case: Case, given: Point) -> tuple[Point, list[str]]:
    """Integer data are labels or indices, held fixed at every point, unless they are numbers
    written without a decimal point (`x=1` for `x=1.0`): an integer scalar that the forward
    accepts as a float, giving the same loss, is one (labels come as arrays). Those become float data, rounded to the run's dtype
    and redrawn at random points like any other, so that a manual gradient that forgets a
    factor x is not hidden by x = 1 at every point. The ones still held fixed are named in a
    note, with what that cannot see."""
    integers = [name for name, value in given.data.items() if not value.is_floating_point() and value.dtype != torch.bool]
    scalars = [name for name in integers if given.data[name].dim() == 0]
    if not integers:
        return given, []
    with torch.no_grad():
        loss, _ = call_forward(case, given)
    numbers = {}
    for name in scalars:
        as_float = given.data[name].to(torch.float64)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                other, _ = call_forward(case, with_data(given, {name: as_float}))
        except CaseError:  # an index, a label, a size: it must stay an integer
            continue
        if torch.equal(other.to(loss.dtype), loss):
            numbers[name] = as_float
    fixed = [name for name in integers if name not in numbers]
    notes = []
    if fixed:
        names = ", ".join(repr(name) for name in fixed)
        notes.append(
            f"integer data {names} are held fixed at every point (labels or indices): a gradient's "
            "dependence on them is not varied; give them as floats (1.0) if they are numbers"
        )
    return with_data(given, numbers), notes
