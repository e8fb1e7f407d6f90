"""Hints: when a wrong gradient follows a pattern, say which slip of a derivation makes it.

The patterns, tried on the whole tensors of the odd source and a reference (autograd when the
manual gradient is the culprit, the numerical one when autograd is):

- a constant factor over the whole tensor: ×2, ×½, ×−1, ×N or ×1/N, N being a size of the
  data (the samples a mean runs over), or any other factor shared by every element; on a large
  tensor whose numerical reference is a sample, by every element estimated (SAMPLED_LEAST or more);
- a wrong shape (a transposed matrix, per-sample gradients left unreduced): shapes.py finds
  the slip, the message states it, and the hint says what the chain rule wants instead;
- a square matrix equal to the reference's transpose (its shape could not tell);
- right at the given point, wrong at random points: a missing factor that equals 1 there
  (the tutorials' x = 1 hides a forgotten dŷ/dw = x), or a gradient that is the same at every
  point (a number worked out at the given point and written in);
- zero in every element: nothing flows back (a detached tensor, a missing create_graph=True);
- autograd the culprit and a custom `torch.autograd.Function` in its graph: that class's backward;
- a complex parameter's gradient that is the conjugate of the true one (∂L/∂z where torch's
  convention is ∂L/∂x + i·∂L/∂y = 2·∂L/∂z̄), or half of it (∂L/∂z̄ without torch's factor 2).
"""
from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from backprop_check import dtypes
from backprop_check.model.complexes import CONVENTION
from backprop_check.records import Check, CheckKind, Culprit, MISMATCH

if TYPE_CHECKING:
    from backprop_check.records import Outcome

# How close a ratio must be to a named factor, by the dtype the gradients were computed in.


def hints_for(shown: Outcome, outcomes: list[Outcome], code: str = "", forward_code: str = "") -> list[str]:
    """Hints for the shown (failing) outcome; `outcomes` are all the points of the result;
    `code` the source of the manual gradient (see `code_of`), which a hint may quote;
    `forward_code` the forward's (a factor 2 is said to be a square's only where one is in sight)."""
    hints: list[str] = []
    factors: dict[tuple[str, str], list[str]] = {}
    # A distributed check names the factor itself (2 = the world size: an all-reduce done twice)
    diagnosed = any(LIKELY_SLIP in (c.note or "") for c in shown.checks)

    def factor_of(check: Check, odd: torch.Tensor, reference: torch.Tensor) -> str | None:
        own = code if check.culprit == Culprit.MANUAL else ""  # a .mean() is quoted from the manual code only
        return _factor_reason(odd, reference, shown, str(check.culprit), own, f"{own}\n{forward_code}")

    for check in _wrong(shown):
        remedy = check.slip.remedy(check.name) if check.slip is not None else None
        if remedy:
            hints.append(remedy)
    for check, odd, reference in _suspects(shown):
        if check.slip is not None:  # a wrong shape: said above, and no factor pattern applies
            continue
        odd = odd.reshape(reference.shape)
        broken = ~torch.isfinite(odd)
        if bool(broken.any()):  # where the true gradient is finite (`_suspects`)
            hints.append(
                f"the {check.culprit} dloss/d{check.name} is {'NaN' if bool(odd.isnan().any()) else 'infinite'} at "
                f"{int(broken.sum())} of {broken.numel()} elements where the true gradient is finite: often a branch that "
                "torch.where or a mask leaves unused still has its gradient computed, and 0 times an infinite local "
                "gradient there is NaN (sqrt, log or a division at values that branch never uses); give that branch a "
                "safe input too, e.g. torch.sqrt(torch.where(x > 0, x, 1)) inside the torch.where"
            )
            continue
        if not bool(reference.any()) and bool(odd.ne(0).all()):
            hints.append(
                f"the true dloss/d{check.name} is 0 at every element (the forward does not move with it here) while the "
                f"{check.culprit} gradient is not: a forward that rounds, quantizes or takes a sign with an identity "
                "backward (a straight-through estimator) is such a surrogate by design, which no gradient check can "
                "confirm; else the backward differentiates something the forward does not compute (a .detach(), "
                "a torch.no_grad() block)"
            )
            continue
        if check.complex:
            conjugated = _conjugate_hint(check, odd, reference, _rtol(shown))
            if conjugated:
                hints.append(conjugated)
                continue
        transposed = None if check.complex else _transpose_hint(check, odd, reference, _rtol(shown))
        if transposed:
            hints.append(transposed)
            continue
        reason = None if diagnosed else factor_of(check, odd, reference)
        if reason and check.complex:
            conjugate = f"half the true gradient: ∂L/∂z̄ without torch's factor 2 ({CONVENTION})"
            reason = reason.replace(f"{_HALF} (d(s²)/ds = 2s)", conjugate).replace(_HALF, conjugate)
        if reason:
            factors.setdefault((str(check.culprit), reason), []).append(check.name)
    for check, odd, reference in _sampled(shown):  # a large tensor: the factor of the elements estimated
        reason = None if diagnosed or check.slip is not None or check.complex else factor_of(check, odd, reference)
        if reason and not reason.startswith(NOTHING_FLOWS):
            where = "at every element estimated numerically"
            reason = reason.replace("in every element", where) if "in every element" in reason else f"{reason} ({where})"
            factors.setdefault((str(check.culprit), reason), []).append(check.name)
    for (source, reason), names in factors.items():
        grads = ", ".join(f"dloss/d{name}" for name in names)
        hints.append(f"the {source} {grads} {'is' if len(names) == 1 else 'are each'} {reason}")
    hints.extend(_padding_hints(shown))
    hints.extend(_given_point_hints(shown, outcomes))
    hints.extend(_function_hints(shown))
    hints.extend(_shared_derivation_hints(shown))
    return hints


def _padding_hints(shown: Outcome) -> list[str]:
    """A disagreement at an embedding's padding row: torch's convention (a zero gradient for a
    row the forward reads), not a derivative, so no gradient check can confirm it."""
    padding = {} if shown.graph is None else shown.graph.padding
    for check in shown.checks:
        rows = padding.get(check.name, [])
        if check.verdict != MISMATCH or check.kind != CheckKind.PARAM or not check.index or check.index[0] not in rows:
            continue
        row = check.index[0]
        return [
            f"row {row} of `{check.name}` is read by an embedding with padding_idx={row}: torch gives that row a zero "
            "gradient by design (nn.Embedding keeps the padding vector fixed in training) although the forward reads "
            "it, so the finite differences see a derivative the backward leaves out; no slip if the row is meant to "
            f"stay fixed: check with padding_idx=None, or with ids that avoid row {row}"
        ]
    return []


def _shared_derivation_hints(shown: Outcome) -> list[str]:
    """Manual and autograd agree and the referee, precise there, does not: two against one
    blames the referee, but both may come from one formula (a manual VJP written from a custom
    backward, or the backward from the manual derivation), slipped once."""
    for check in shown.checks:
        bar, gap = check.error_bar, check.abs_err
        if check.verdict != MISMATCH or check.culprit != Culprit.NUMERICAL or bar is None or not gap:
            continue
        if not 0 <= PRECISE_REFEREE * bar < gap:
            continue
        functions = [] if shown.graph is None else list(dict.fromkeys(f for found in shown.graph.functions.values() for f in found))
        shared = f" and the backward of {' and '.join(f.__qualname__ for f in functions)}" if functions else ""
        return [
            f"manual and autograd agree, but the finite differences are precise here (± {bar:.2g} against a "
            f"difference of {gap:.3g}): the manual gradient{shared} may share one slipped derivation (one written "
            "from the other); check that formula before the referee"
        ]
    return []


def _wrong(shown: Outcome) -> list[Check]:
    """The wrong names whose culprit is manual or autograd: nodes from the loss back first
    (where the slip starts), then parameters."""
    checks = [c for c in shown.checks if c.kind == CheckKind.NODE] + [c for c in shown.checks if c.kind == CheckKind.PARAM]
    return [c for c in checks if c.verdict == MISMATCH and c.culprit in (Culprit.MANUAL, Culprit.AUTOGRAD)]


def _suspects(shown: Outcome) -> Iterator[tuple[Check, torch.Tensor, torch.Tensor]]:
    """(check, odd tensor, reference tensor) for each of `_wrong`'s names where both are whole."""
    for check, odd, ref in _references(shown):
        if bool(torch.isfinite(ref).all()):  # a sampled numerical estimate is not whole
            yield check, odd, ref


def _sampled(shown: Outcome) -> Iterator[tuple[Check, torch.Tensor, torch.Tensor]]:
    """(check, odd elements, reference elements) for each of `_wrong`'s names whose numerical
    reference is sampled (a large tensor: the elements estimated, flat) at SAMPLED_LEAST elements
    or more: enough for a factor shared by all of them to say something of the whole tensor."""
    for check, odd, ref in _references(shown):
        estimated = torch.isfinite(ref)
        if not bool(estimated.all()) and int((ref[estimated] != 0).sum()) >= SAMPLED_LEAST:
            yield check, odd.reshape(ref.shape)[estimated], ref[estimated]


def _references(shown: Outcome) -> Iterator[tuple[Check, torch.Tensor, torch.Tensor]]:
    for check in _wrong(shown):
        odd = shown.gradients.get(check.culprit)
        reference = shown.gradients.get("autograd" if check.culprit == Culprit.MANUAL else "numerical")
        if reference is None:  # a numpy case has no autograd: the numerical gradient is the reference
            reference = shown.gradients.get("numerical")
        if odd is None or reference is None or check.name not in odd.values or check.name not in reference.values:
            continue
        odd_values = odd.values[check.name].detach().to("cpu", torch.float64)
        ref = reference.values[check.name].detach().to("cpu", torch.float64)
        if odd_values.numel() == ref.numel():
            yield check, odd_values, ref


def _conjugate_hint(check: Check, odd: torch.Tensor, reference: torch.Tensor, rtol: float) -> str | None:
    """A complex gradient (as its real view) equal to the conjugate of the true one, or to half
    of it: the derivative ∂L/∂z of the other Wirtinger convention."""
    conjugate = reference * torch.tensor([1.0, -1.0], dtype=reference.dtype)
    if _close(conjugate, reference, rtol):  # a real gradient is its own conjugate: no finding
        return None
    grad = f"the {check.culprit} dloss/d{check.name}"
    if _close(odd, conjugate, rtol):
        return (
            f"{grad} is the complex conjugate of the true gradient: the unconjugated derivative (2·∂L/∂z, "
            f"f'(z) for L = Re f(z)), while {CONVENTION}; conjugate it (.conj())"
        )
    if _close(odd, conjugate / 2, rtol):
        return (
            f"{grad} is half the conjugate of the true gradient: ∂L/∂z, the Wirtinger derivative of the other "
            f"convention, while {CONVENTION}; conjugate it and multiply by 2"
        )
    return None


def _transpose_hint(check: Check, odd: torch.Tensor, reference: torch.Tensor, rtol: float) -> str | None:
    """A square matrix equal to the reference's transpose: the shapes cannot tell."""
    if odd.dim() != 2 or odd.shape[0] != odd.shape[1] or odd.shape[0] < 2:
        return None
    if _close(reference, reference.T, rtol) or not _close(odd, reference.T, rtol):
        return None
    return (
        f"the {check.culprit} dloss/d{check.name} is the transpose of the true gradient ({check.name} is "
        f"square, so its shape could not tell): multiply the chain in the other order (for h = W·x, "
        f"dloss/dW = δ·xᵀ)"
    )


# A factor fitted within this fraction of a named one (2, ½, 1/N, −1) is named.
NAMED_WITHIN = 0.05
# A sampled reference (a large tensor) names a factor only where it estimated this many nonzero
# elements: one number is always some multiple of another, eight that share one are a pattern.
SAMPLED_LEAST = 8
# The hint for a gradient that is zero in every element (a more specific one may replace it).
# A referee whose error bar is this many times below a disagreement is not its likely source.
PRECISE_REFEREE = 1000.0
# How a distributed check says the slip it sees (engine/distributed.py), which no factor hint repeats.
LIKELY_SLIP = "likely slip: "
# How the contract's layout item opens a finding in a custom Function's forward (not its backward).
FORWARD_LAYOUT = "the forward of "
NOTHING_FLOWS = "zero in every element while the true gradient is not: no gradient flows back to it"


def _factor_reason(
    odd: torch.Tensor, reference: torch.Tensor, shown: Outcome, culprit: str, code: str = "", seen: str = ""
) -> str | None:
    """Why `odd` is a constant multiple of `reference`, or None when it is not one."""
    norm = float((reference * reference).sum())
    if norm == 0.0:
        return None
    if not bool(odd.any()):  # 0× is no constant factor: nothing reaches this tensor at all
        return f"{NOTHING_FLOWS}. {_ZERO.get(culprit, '')}".strip()
    factor = float((odd * reference).sum()) / norm
    rtol = _rtol(shown)
    scale = float((factor * reference).abs().max())
    if not bool(((odd - factor * reference).abs() <= rtol * (factor * reference).abs() + rtol * scale).all()):
        return None
    # A factor of 1 within the dtype's noise is no finding; in bfloat16 the named factors' own
    # margin (10·rtol: half of 1) must not read it as "twice" (one wrong element among right ones).
    if abs(factor - 1) <= 2 * rtol:
        return None
    # The factor is a least-squares fit over the whole tensor, far more precise than one element:
    # a named factor within 10·rtol of it, but never beyond NAMED_WITHIN (bfloat16's rtol would
    # read 1.1× as "twice").
    near = min(10 * rtol, NAMED_WITHIN)
    named = [reason for value, reason in _named_factors(shown, code, seen) if abs(factor - value) <= near * abs(value)]
    if named:
        return " or ".join(named)
    if int((reference != 0).sum()) < 2:  # one number is always some multiple of another
        return None
    if abs(factor - 1) <= 10 * rtol:  # a factor the dtype's noise could make is no finding
        return None
    return f"{factor:.6g}× the true gradient in every element: a constant factor is wrong"


_ZERO = {
    Culprit.AUTOGRAD: (
        "autograd's graph is cut on the way: a tensor detached (.detach(), .data, .item(), numpy, "
        "torch.no_grad()), or a torch.autograd.grad inside the forward without create_graph=True"
    ),
    Culprit.MANUAL: "The manual gradient returns zeros: a term never added, or an accumulator left at its start value",
}


_HALF = "half the true gradient: a missing factor 2"
# A square on the way (s**2, s.pow(2), np.square(s), s * s): its derivative 2s is the usual factor 2.
_SQUARE = re.compile(r"\*\*\s*2\b|\.pow\(\s*2\s*\)|square\(|\b(\w+)\s*\*\s*\1\b")


# A `.mean()` with nothing to average over: the tutorial's `np.dot(2*x, y_pred - y).mean()`.
_EMPTY_MEAN = re.compile(r"\.mean\(\s*\)")


def _named_factors(shown: Outcome, code: str = "", seen: str = "") -> list[tuple[float, str]]:
    # Said only where the manual gradient's code has a .mean(): elsewhere it explains nothing.
    why = " (a .mean() of a number that is already a sum does nothing)" if _EMPTY_MEAN.search(code) else ""
    sizes = _batch_sizes(shown, inputs=True)
    factors = [(n, f"{n}× the true gradient, with N = {n} = {label}: the 1/N of a mean over the batch is "
                   f"missing{why}")
               for n, label in sizes]
    factors += [(1 / n, f"1/{n} of the true gradient, with N = {n} = {label}: divided by N once too often")
                for n, label in sizes]
    # An attention's 1/√d: the scale of a score q·k/√d, missing from a hand-written dQ or dK.
    roots = [(r, n, label) for n, label in sizes if (r := math.isqrt(n)) > 1 and r * r == n]
    factors += [(r, f"{r}× the true gradient, with {r} = √{n} = √{label}: a 1/√d scale missing (as of q·k/√d)")
                for r, n, label in roots]
    factors += [(1 / r, f"1/{r} of the true gradient, with {r} = √{n} = √{label}: a 1/√d scale applied twice")
                for r, n, label in roots]
    # d(s²)/ds is named only where the code `seen` (the forward's, the manual gradient's) shows a
    # square: the factor ½ of a dropout's 1/p at p = ½, or of GELU's x·φ(x) term near 0, is none.
    square = bool(_SQUARE.search(seen))
    factors += [
        (2.0, "twice the true gradient: a factor 2 too many" + (" (d(s²)/ds is 2s, and only once)" if square else "")),
        (0.5, _HALF + (" (d(s²)/ds = 2s)" if square else "")),
        (-1.0, "the true gradient with the sign flipped: a minus lost, or ŷ − y and y − ŷ swapped"),
        (-2.0, "−2× the true gradient: the sign flipped and a factor 2 too many"),
        (-0.5, "−½× the true gradient: the sign flipped and a factor 2 missing"),
    ]
    return factors


def _batch_sizes(shown: Outcome, inputs: bool = False) -> list[tuple[int, str]]:
    """Sizes of the data a mean may run over, leading dimensions first, each with its name; with
    `inputs`, the differentiated inputs' dimensions after them (a function's inputs are its
    parameters: log-probabilities over a vocabulary of V, an attention head of d)."""
    sizes: dict[int, str] = {}
    # a complex datum's real view ends in its two parts: no size a mean runs over
    values = {**shown.point.data, **(shown.point.params if inputs else {})}
    data = {k: v[..., 0] if k in shown.point.complex else v for k, v in values.items()}
    for dim in range(max((v.dim() for v in data.values()), default=0)):
        for name, value in data.items():
            if value.dim() > dim and value.shape[dim] > 1:
                sizes.setdefault(int(value.shape[dim]), f"{name}.shape[{dim}]")
    for name, value in data.items():
        if value.dim() > 1:
            sizes.setdefault(value.numel(), f"{name}.numel()")
    return list(sizes.items())


def _given_point_hints(shown: Outcome, outcomes: list[Outcome]) -> list[str]:
    """Right at the given point, wrong at a random one: a factor that equals 1 there."""
    given = next((o for o in outcomes if o.point.seed is None), None)
    if given is None or shown is given:
        return []
    right_there = {c.name for c in given.checks if c.verdict != MISMATCH}
    ones = [name for name, value in {**given.point.params, **given.point.data}.items()
            if value.numel() and value.is_floating_point() and bool((value == 1).all())]
    hints = []
    for check, odd, reference in _suspects(shown):
        if check.name not in right_there or odd.shape != reference.shape:
            continue
        grad = f"the {check.culprit} dloss/d{check.name}"
        wrong_here = f"right at the given point but wrong at the {shown.point.describe()}"
        if _hard_coded(check, odd, given, outcomes):
            hints.append(
                f"{grad} is {wrong_here}, and has the same value at every point: it does not depend on the "
                f"point, like a number worked out at the given point and written in; compute it from the arguments"
            )
            continue
        if not ones:
            hints.append(f"{grad} is {wrong_here}: whatever the slip is, the given point's values hide it")
            continue
        fits = [name for name in ones if _missing_factor(odd, reference, shown, name)]
        at = ", ".join(f"{name} = 1" for name in ones)
        text = (f"{grad} is right at the given point ({at}) but wrong at the {shown.point.describe()}: "
                "a missing factor that equals 1 at the given point")
        if fits:
            text += f" — multiplied by {' or '.join(fits)} it matches: a local gradient equal to {fits[0]} is missing"
        hints.append(text)
    return hints


def _hard_coded(check: Check, odd: torch.Tensor, given: Outcome, outcomes: list[Outcome]) -> bool:
    """Whether the odd source gives the same gradient at every point it was computed at: at the
    other failing points, and at the given point (where only the shown element is kept)."""
    same: list[bool] = []
    for outcome in outcomes:
        source = outcome.gradients.get(str(check.culprit)) if outcome.gradients else None
        if outcome is not given and source is not None and check.name in source.values:
            other = source.values[check.name].detach().to("cpu", torch.float64)
            same.append(other.shape == odd.shape and bool(torch.equal(other, odd)))
    there = next((c for c in given.checks if c.name == check.name), None)
    value = None if there is None else {Culprit.MANUAL: there.manual, Culprit.AUTOGRAD: there.autograd}.get(check.culprit)
    if value is not None and there is not None and there.index is not None and len(there.index) == odd.dim():
        same.append(abs(float(odd[there.index]) - value) <= 1e-12 * max(1.0, abs(value)))
    return bool(same) and all(same)


def _function_hints(shown: Outcome) -> list[str]:
    """Autograd is the culprit and runs the user's custom Functions: name the one whose backward
    takes the step where the derivation slips (or every one, when the step is not known)."""
    bad = [c for c in shown.checks if c.verdict == MISMATCH and c.culprit == Culprit.AUTOGRAD]
    graph = shown.graph
    if not bad or graph is None or not graph.functions:
        return []
    if all(c.kind == CheckKind.CONTRACT and (c.note or "").startswith(FORWARD_LAYOUT) for c in bad):
        functions = list(dict.fromkeys(f for found in graph.functions.values() for f in found))
        return [
            f"the custom torch.autograd.Function {' and '.join(_function_name(f, 'forward') for f in functions)} gives other outputs "
            f"for the same values in another memory layout: check {functions[0].__qualname__}.forward (a kernel that "
            "reads storage as if it were contiguous, ignoring the strides?)"
        ]
    good = [c.name for c in shown.checks if c.kind == CheckKind.NODE and c.verdict != MISMATCH]
    first = next((c.name for c in bad if c.kind == CheckKind.NODE), None)
    wrong = [first] if first else [c.name for c in bad if c.kind == CheckKind.PARAM]
    suspects: list[type] = []
    for name in wrong:
        for after in graph.nearest(name, good) or [graph.root]:
            suspects += [f for f in graph.functions.get(after, []) if f not in suspects]
    where = "in the step where autograd goes wrong"
    if not suspects:  # the step runs none of them: they stay suspects, the step less sure
        suspects = list(dict.fromkeys(f for found in graph.functions.values() for f in found))
        where = "in its graph"
    named = " and ".join(_function_name(f) for f in suspects)
    return [
        f"autograd runs your custom torch.autograd.Function {named} {where}: autograd uses its backward, "
        f"while the finite differences run only its forward, so check {suspects[0].__qualname__}.backward"
    ]


def _function_name(cls: type, method: str = "backward") -> str:
    """`MyFunction (backward at path.py:42)`, or the class name alone when its code is not at hand."""
    found = getattr(cls, method, None)
    # a decorated backward (@torch.no_grad(), @once_differentiable) is shown where the user wrote it
    code = getattr(inspect.unwrap(found) if callable(found) else None, "__code__", None)
    if code is None:
        return cls.__qualname__
    try:
        path = os.path.relpath(code.co_filename)
    except ValueError:  # another drive (Windows)
        path = code.co_filename
    shown = code.co_filename if path.startswith("..") else path
    return f"{cls.__qualname__} ({method} at {shown}:{code.co_firstlineno})"


def _missing_factor(odd: torch.Tensor, reference: torch.Tensor, shown: Outcome, name: str) -> bool:
    value = {**shown.point.params, **shown.point.data}[name].to(torch.float64)
    if value.numel() == 1:
        value = value.reshape(())
    elif value.shape != reference.shape:
        return False
    return _close(odd * value, reference, _rtol(shown))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(((a - b).abs() <= rtol * b.abs() + rtol * scale + 1e-300).all())


def _rtol(shown: Outcome) -> float:
    autograd = shown.gradients.get("autograd") or shown.gradients.get("manual")  # numpy: no autograd
    dtype = next(iter(autograd.values.values())).dtype if autograd is not None and autograd.values else torch.float64
    return dtypes.row(str(dtype)).hint_rtol


def code_of(fn: Callable[..., object] | None) -> str:
    """The source of a manual gradient `fn` and of the functions of its module it calls by name
    (the tutorial's `.manual` calls its `gradient(x, y, y_pred)`); "" where it cannot be read."""
    if fn is None:
        return ""
    fn = inspect.unwrap(fn)
    found = [fn]
    module_globals = getattr(fn, "__globals__", {})
    for name in getattr(getattr(fn, "__code__", None), "co_names", ()):
        called = module_globals.get(name)
        if inspect.isfunction(called) and called.__module__ == fn.__module__:
            found.append(called)
    texts = []
    for each in found:
        try:
            texts.append(inspect.getsource(each))
        except (OSError, TypeError):  # defined in a REPL or by exec: nothing to quote
            continue
    return "\n".join(texts)
