"""A reference implementation: a kernel that runs in low precision judged against a plain
float64 function, with a tolerance made of the reference's own error at the kernel's precision.

A kernel (Triton, CUDA, or torch code at bfloat16 with float32 accumulation inside) runs in one
low precision, often on one device, and often refuses float64, so the float64 referee cannot
difference it. What kernel suites do instead (flash-attention's, Liger-Kernel's, xformers') is
packaged here, with three sources:

- the **kernel**'s outputs and autograd gradient (its hand-written backward), at its own dtype
  and device, at a point rounded to that dtype (culprit `autograd`);
- the **reference**'s float64 autograd gradient and outputs at that same rounded point, on the
  CPU (`reference(*inputs)`: plain torch, fn's signature and outputs);
- the **numerical** referee, which checks the reference in float64 as it checks any function,
  element localisation and kinks included: a wrong reference is the culprit `reference`, and
  the kernel is not judged against it.

The tolerance (flash-attention's rule, made per element): the reference is run again in the
kernel's dtype on the kernel's device, at the rounded point and at two points one ulp of the
dtype away; its own error there, |reference_dtype − reference_float64|, is what rounding honestly
does to this computation. An element of the kernel may be off from the float64 reference by

    MULTIPLE · max(own error at the element, the 90th percentile of the tensor's own errors)
      + FLOOR_ULPS · eps · |reference| + TENSOR_ULPS · eps · rms(reference)

- per element, so that a slip of 1.25× in one bfloat16 element (some 60 of its ulps) is caught
  where a tensor-wide maximum would hide it under the largest element's rounding;
- the largest own error of three samples (the rounded point and its two neighbours), and never
  below the 90th percentile of the tensor's (TYPICAL), so that an element where the reference
  happened to round well is not a false alarm, nor one where a kernel that computes in another
  order rounds worse than the reference there (its errors are the reference's in size, not
  element for element);
- the floor: a few ulps of the element itself (the kernel's final rounding to its dtype, which
  the reference may happen to avoid), and one ulp of the tensor's root-mean-square value (an
  element that cancels is rounded on the scale of its terms, where a kernel that keeps a partial
  sum in its dtype differs from a reference that rounds once). So a 1.25× slip is caught in
  every element larger than a few percent of the tensor's rms value (in bfloat16);
- plus the case's own `rtol=` (of |reference|) and `atol=`, where given: a kernel that rounds an
  intermediate the reference never forms (flash-attention's D = rowsum(dO·O) with O stored in
  bfloat16, where V has a mean of 50) can be off far more at a few elements than the reference
  anywhere near them, while within 2× of its largest over the tensor; its author says how much.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from backprop_check.dtypes import name_of
from backprop_check.errors import CaseError, CaseTimeout
from backprop_check.model import forward
from backprop_check.engine.orders import Derivative
from backprop_check.engine.tolerance import tolerance_for
from backprop_check.engine.verdict import KERNEL_COMPARED, error_result, outcome_of, summarize
from backprop_check.model.points import Point, derive_seed, given_point
from backprop_check.model.case import Case
from backprop_check.records import MISMATCH, NONDIFFERENTIABLE, OK, Check, CheckKind, Culprit, Outcome, Result
from backprop_check.sources import Gradients, autograd

# The kernel may be off by this many times the reference's own error at its precision
# (flash-attention allows 2× of a tensor-wide maximum; an element's own error is noisier).
MULTIPLE = 4.0
# … plus this many ulps (eps·|value|) of the element: the kernel's final rounding.
FLOOR_ULPS = 4.0
# … plus this many ulps of the tensor's root-mean-square value: an element that is a small
# difference of large terms (a dot product that cancels) is rounded on the scale of its terms,
# which the reference, rounding once at the end, need not show at that element.
TENSOR_ULPS = 1.0
# An element's own error is taken no lower than this quantile of the tensor's: a kernel that
# computes in another order errs like the reference, but not element for element (a fused
# attention backward's D = rowsum(dO·O) rounds where the reference's softmax backward is exact,
# 73× the reference's own error at that element, half its largest over the tensor). The median
# cried wolf there; the 90th percentile keeps the slips of a battery of 53 found (the closest at
# 1.35× the tolerance, where the median gave 3.4×).
TYPICAL = 0.9
# The reference's own error is sampled at the rounded point and one ulp either side of it.
NUDGES = (0.0, 1.0, -1.0)
COMPARED = KERNEL_COMPARED
OVERFLOWED = (
    "the reference overflows {dtype} here (`{op}` makes an infinity of finite values): its own {dtype} error "
    "measures no rounding, so the kernel is held to 4 ulps of each element and 1 ulp of its tensor's rms there"
)
# The custom-Function contract's items a kernel is held to in its own dtype: those that read no
# values (a gradient of the wrong dtype or shape, a grad_output edited in place); the items that
# compare values (linearity, repeatability, layouts, vmap) are float64's, without reference=.
KERNEL_CONTRACT = ("grad_meta", "in_place")


def applies(case: Case) -> bool:
    """Whether `case` is a kernel checked against a reference implementation (at order 2 and
    above, the derivative of one: orders.py)."""
    return getattr(getattr(case, "root", case), "reference", None) is not None


def run_dtypes(case: Case) -> tuple[str, ...] | None:
    """The dtypes a kernel runs in whatever the run's are (function_case's `dtypes=`), or None."""
    return getattr(getattr(case, "root", case), "run_dtypes", None)


def twin_of(case: Case, seed: int, full: bool) -> Case:
    """The reference's check that mirrors `case`: the same derivative of the same inputs."""
    root = getattr(case, "root", case)
    twin = root.twin()
    given = given_point(twin, seed)
    for level in range(2, case.level + 1):
        twin = Derivative(twin, given, level, functional=full)
        given = given_point(twin, seed)
    return twin


def tolerance_text(dtype: torch.dtype) -> str:
    name = name_of(dtype)
    return f"{MULTIPLE:g}× the reference's own {name} error + {FLOOR_ULPS:g} ulps + {TENSOR_ULPS:g} ulp of the tensor's rms"


@dataclass(frozen=True)
class Values:
    """One side's outputs and gradients at one point (float64, on the CPU)."""

    outputs: tuple[torch.Tensor, ...]
    gradients: dict[str, torch.Tensor]


def evaluate(case: Any, point: Point, device: str, dtype: torch.dtype, who: str) -> Values:
    """`case`'s floating outputs and autograd gradient at `point` in `dtype` on `device`;
    what goes wrong is one line naming `who` (the kernel, the reference) and the dtype."""
    name = name_of(dtype)
    try:
        outputs = forward.outputs(case, point.cast(dtype, device)) if case.level == 1 else ()
        gradients = autograd.gradient(case, point, device, dtype).values
    except CaseError as exc:
        raise CaseError(f"{who} in {name} on {device}: {exc}") from exc
    return Values(
        tuple(o.detach().to("cpu", _wide(o.dtype)) for o in outputs),
        {k: g.detach().to("cpu", torch.float64) for k, g in gradients.items() if k in point.params},
    )


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def nudged(point: Point, dtype: torch.dtype, sign: float, seed: int) -> Point:
    """`point` (already rounded to `dtype`) moved by one `dtype` ulp per float element, with
    random signs: another point of the same computation, with its own roundings."""
    if sign == 0.0:
        return point
    gen = torch.Generator().manual_seed(seed)

    def moved(value: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            return value
        low = value.to(dtype)
        ulp = (torch.nextafter(low, torch.full_like(low, torch.inf)) - low).to(torch.float64)
        signs = torch.randint(0, 2, value.shape, generator=gen, dtype=torch.float64) * 2 - 1
        return (value + sign * signs * ulp).to(dtype).to(torch.float64)

    return replace(
        point,
        params={k: moved(v) for k, v in point.params.items()},
        data={k: moved(v) for k, v in point.data.items()},
    )


@dataclass
class Judged:
    """The kernel against the float64 reference in one tensor, element by element."""

    kernel: torch.Tensor
    reference: torch.Tensor
    own: torch.Tensor  # the reference's own error at the kernel's precision, per element
    allowed: torch.Tensor

    @property
    def error(self) -> torch.Tensor:
        error = (self.kernel - self.reference).abs()
        # a NaN or an infinity where the reference is finite is as wrong as it gets
        return torch.where(torch.isfinite(error), error, torch.full_like(error, torch.inf))


def judge(
    kernel: torch.Tensor, reference: torch.Tensor, own: torch.Tensor, dtype: torch.dtype, given: tuple[float, float] = (0.0, 0.0)
) -> Judged:
    """The tolerance of every element (see the module docstring); `given`: the case's own
    (rtol, atol), 0 where not given."""
    eps = torch.finfo(dtype).eps
    own = torch.nan_to_num(own, nan=0.0, posinf=0.0)  # the reference overflowed: no excuse from it
    typical = _quantile(own, TYPICAL)
    rms = float(reference.square().mean().sqrt()) if reference.numel() else 0.0
    allowed = MULTIPLE * own.clamp(min=typical) + FLOOR_ULPS * eps * reference.abs() + TENSOR_ULPS * eps * rms
    rtol, atol = given
    if rtol or atol:
        allowed = allowed + rtol * reference.abs() + atol
    return Judged(kernel, reference, own, allowed)


def _quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of `values` (kthvalue: no size limit, unlike torch.quantile)."""
    flat = values.reshape(-1)
    if not flat.numel():
        return 0.0
    return float(flat.kthvalue(max(1, math.ceil(q * flat.numel()))).values)


def compare(
    name: str, kind: CheckKind, judged: Judged, dtype: torch.dtype, culprit: Culprit | None, complex_: bool = False,
    level: int = 1,
) -> Check:
    """One tensor's check: its worst element, named, with both errors and their ratio."""
    error, allowed = judged.error, judged.allowed
    bad = error > allowed
    ratios = torch.where(allowed > 0, error / allowed.clamp(min=torch.finfo(torch.float64).tiny), error * torch.inf)
    ratios = torch.nan_to_num(ratios, nan=0.0, posinf=math.inf)
    flat = int(ratios.reshape(-1).argmax()) if ratios.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratios.shape)) if ratios.numel() else ()
    at = (lambda t: float(t.reshape(-1)[flat])) if ratios.numel() else (lambda t: 0.0)
    k, r, own, e, a = at(judged.kernel), at(judged.reference), at(judged.own), at(error), at(allowed)
    count = int(bad.sum())
    verdict = MISMATCH if count else OK
    check = Check(
        name=name, kind=kind, shape=tuple(judged.reference.shape), verdict=verdict, culprit=culprit if count else None,
        index=index, autograd=k, reference=r, abs_err=e, rel_err=e / abs(r) if r else (float("inf") if e else 0.0),
        allowed=a, ratio=at(ratios), bad=count, size=int(ratios.numel()), compared=COMPARED,
        complex=complex_,
        culprits={culprit: count} if count and culprit is not None else {},
    )
    check.note = _note(check, judged, own, dtype, level)
    return check


def _given(kernel: Any, dtype: torch.dtype) -> tuple[float, float]:
    """The (rtol, atol) the case gives for `dtype` (a number, or a dict by dtype name), 0 if none."""
    tol = tolerance_for(dtype, getattr(kernel, "rtol", None), getattr(kernel, "atol", None))
    return tol.rtol_given, tol.absolute


def _note(check: Check, judged: Judged, own: float, dtype: torch.dtype, level: int = 1) -> str:
    name = name_of(dtype)
    derivative = "gradient of" if level == 1 else f"derivative of order {level} (double backward) with respect to"
    what = f"the kernel's {check.name}" if check.kind == CheckKind.OUTPUT else f"the kernel's {derivative} `{check.name}`"
    there = f"{check.abs_err / own:.3g}× the reference's own {name} error {own:.2g} there" if own else f"where the reference is exact in {name}"
    worst_kernel = float(judged.error.max()) if judged.error.numel() else 0.0
    worst_own = float(judged.own.max()) if judged.own.numel() else 0.0
    overall = (
        f"; over the whole tensor the kernel's largest error is {worst_kernel / worst_own:.3g}× the reference's largest own {name} error"
        if worst_own else ""
    )
    if worst_own and worst_kernel <= 2 * worst_own:
        overall += (
            " (within flash-attention's 2× of it: a kernel that rounds an intermediate the reference never forms "
            "errs most at a few elements; give rtol=/atol= to allow that)"
        )
    text = (
        f"{what} at {check.label}: kernel {check.autograd:.8g}, float64 reference {check.reference:.8g}; "
        f"error {check.abs_err:.3g}, {there}, {check.ratio:.3g}× the tolerance {check.allowed:.3g} "
        f"({tolerance_text(dtype)}){overall}"
    )
    if check.bad > 1:
        text += f"; {check.bad} of {check.size} elements disagree"
    return text


class Overflows(TorchDispatchMode):
    """The first op that makes an infinity or a NaN of finite operands (x·x past float16's 65504,
    exp of 89 in bfloat16): where the reference overflows at the kernel's precision, its own
    error there is as large as the values and measures no rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        if self.first is None and _non_finite(out) and not _non_finite((args, kwargs)):
            self.first = str(getattr(func, "__name__", func)).split(".")[0]
        return out


def _non_finite(value: Any) -> bool:
    for leaf in tree_leaves(value):
        if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex()) and leaf.numel():
            if leaf.layout == torch.strided and not leaf._is_zerotensor() and not bool(torch.isfinite(leaf).all()):
                return True
        elif isinstance(leaf, float) and not math.isfinite(leaf):
            return True
    return False


def kernel_checks(kernel: Any, twin: Any, point: Point, device: str, dtype: torch.dtype, seed: int) -> tuple[list[Check], Gradients, Gradients]:
    """The kernel's outputs and gradients against the float64 reference at `point` rounded to
    `dtype`, with the gradients of both (for the hints). Where the reference overflows at the
    kernel's precision (`Overflows`), its own error there is no yardstick and counts as 0: the
    kernel is held to its ulps alone, and a note says so (`OVERFLOWED`)."""
    at = point.rounded(dtype)
    got = evaluate(kernel, at, device, dtype, "the kernel")
    given = _given(kernel, dtype)
    own_outputs: list[torch.Tensor] = []
    own_gradients: dict[str, torch.Tensor] = {}
    base: Values | None = None
    overflowed: str | None = None
    for sign in NUDGES:
        here = nudged(at, dtype, sign, derive_seed(seed, "reference", kernel.name, point.label, sign))
        exact = evaluate(twin, here, "cpu", torch.float64, "the reference")
        watch = Overflows()
        with watch:
            low = evaluate(twin, here, device, dtype, "the reference (run at the kernel's precision for its own error)")
        if watch.first is not None:
            overflowed = overflowed or watch.first
            low = exact  # no excuse from a run that overflowed
        base = base or exact
        errors = [(low_output - output).abs() for output, low_output in zip(exact.outputs, low.outputs)]
        own_outputs = [torch.maximum(a, b) for a, b in zip(own_outputs, errors)] if own_outputs else errors
        for name, value in exact.gradients.items():
            error = (low.gradients[name] - value).abs()
            own_gradients[name] = torch.maximum(own_gradients[name], error) if name in own_gradients else error
    assert base is not None
    checks = []
    for k, (mine, theirs) in enumerate(zip(got.outputs, base.outputs)):
        judged = judge(_real(mine), _real(theirs), _real_own(own_outputs[k], theirs), dtype, given)
        # A wrong forward is the kernel's, but not a gradient source's: no culprit is named.
        checks.append(compare(f"output {k}", CheckKind.OUTPUT, judged, dtype, None))
    # Where the outputs already differ, the kernel and the reference are two functions: a
    # gradient that differs too is not the backward's fault alone.
    forward_differs = any(c.verdict == MISMATCH for c in checks)
    culprit = None if forward_differs else Culprit.AUTOGRAD
    for name, theirs in base.gradients.items():
        judged = judge(got.gradients[name], theirs, own_gradients[name], dtype, given)
        checks.append(compare(name, CheckKind.PARAM, judged, dtype, culprit, name in point.complex, kernel.level))
    # The kernel's gradient in its own dtype: the hints judge a factor by the dtype's noise.
    mine = {name: g.to(dtype) for name, g in got.gradients.items()}
    theirs = Gradients("numerical", base.gradients)
    if overflowed is not None:
        theirs.note = OVERFLOWED.format(dtype=name_of(dtype), op=overflowed)
    return checks, Gradients("autograd", mine), theirs


def _contract_checks(kernel: Any, point: Point, device: str, dtype: torch.dtype) -> list[Check]:
    """The kernel's custom-Function contract in its own dtype at the given point (KERNEL_CONTRACT)."""
    from backprop_check.engine import contract
    from backprop_check.engine.tolerance import tolerance_for

    if not set(getattr(kernel, "contract", ())) & set(KERNEL_CONTRACT) or kernel.level != 1:
        return []
    return contract.checks(kernel, point.rounded(dtype), device, dtype, tolerance_for(dtype), only=KERNEL_CONTRACT)


def _real(value: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(value) if value.is_complex() else value


def _real_own(own: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A complex output's own error, per part (its modulus bounds both)."""
    return own.unsqueeze(-1).expand(*own.shape, 2) if like.is_complex() else own


def as_reference(checks: list[Check], tolerance: str) -> list[Check]:
    """The referee's checks of the reference, where `autograd` is the reference's: a wrong
    one is said in those words, with the float64 tolerance it was judged by."""
    for check in checks:
        check.culprits = {(Culprit.REFERENCE if c == Culprit.AUTOGRAD else c): n for c, n in check.culprits.items()}
        check.compared = "the reference against the numerical referee"
        if check.culprit != Culprit.AUTOGRAD:
            continue
        check.culprit = Culprit.REFERENCE
        if check.index is not None and check.numerical is not None and check.autograd is not None:
            check.note = (
                f"the reference's float64 gradient of `{check.name}` at {check.label}: reference (autograd) "
                f"{check.autograd:.8g}, numerical {check.numerical:.8g} ± {check.error_bar or 0.0:.2g}; error "
                f"{check.abs_err:.3g}, {check.ratio:.3g}× the tolerance {check.allowed:.3g} ({tolerance}); a wrong "
                "reference is no yardstick: the kernel is not judged against it there"
            )
            if check.bad > 1:
                check.note += f"; {check.bad} of {check.size} elements disagree"
    return checks


def check_combination(
    kernel: Case, twin: Case, points: list[Point], referee: dict[str, list[Check]], device: str, dtype_name: str, plan: Any
) -> Result:
    """The kernel on one device in one dtype at every point, against the float64 reference."""
    dtype = getattr(torch, dtype_name)
    outcomes: list[Outcome] = []
    notes: list[str] = []
    point = points[0]
    try:
        for point in points:
            refereed = [replace(check) for check in referee[point.label]]
            wrong = {c.name for c in refereed if c.verdict in (MISMATCH, NONDIFFERENTIABLE) and c.kind == CheckKind.PARAM}
            checks, mine, theirs = kernel_checks(kernel, twin, point, device, dtype, plan.seed)
            if theirs.note and theirs.note not in notes:
                notes.append(theirs.note)
            if point.seed is None:
                checks += _contract_checks(kernel, point, device, dtype)
            # Against a reference the referee finds wrong (or at a kink), the kernel cannot be judged.
            judged = [c for c in checks if c.kind != CheckKind.PARAM or c.name not in wrong]
            note = "where the reference itself is wrong or on a kink, the kernel is not judged against it"
            if len(judged) < len(checks) and note not in notes:
                notes.append(note)
            gradients = {"manual": None, "numerical": theirs, "autograd": mine}
            outcomes.append(outcome_of(point, refereed + judged, gradients, None))
    except CaseTimeout:
        raise
    except CaseError as exc:
        return error_result(kernel, device, dtype_name, str(exc.at(point.describe())), exc)
    result = summarize(kernel, device, dtype_name, outcomes, tolerance_text(dtype))
    result.notes.extend(notes)
    return result
