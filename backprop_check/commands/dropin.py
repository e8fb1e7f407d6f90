"""`gradcheck` and `gradgradcheck`: drop-ins for torch's, so a test suite switches with one
import line:

    from backprop_check import gradcheck        # was: from torch.autograd import gradcheck
    assert gradcheck(MyFn.apply, (x, w))
    assert gradcheck(MyFn.apply, (x, w), check_forward_ad=True)   # the Function's jvp too
    assert gradgradcheck(MyFn.apply, (x, w))    # double backward (order 2)

Like torch's, it checks the given inputs only, in their own dtype and on their device, and
returns True when everything agrees. Unlike torch's, its reference has an error bar (so a
float32 input is judged fairly), its cotangents are random, it checks the custom-Function
contract, and a failure says which source is wrong, for which output and input, at which
element, with the three values and the tolerance. Where torch has nothing to check (every
input empty, or no floating-point output: `x.argmax()`) it answers True, as torch does; outputs autograd declares non-differentiable are
left out, as in torch (docs/explanation/dropin.md says what else differs, and why).
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from backprop_check.engine.contract import ITEMS
from backprop_check.errors import CaseError
from backprop_check.formats import text
from backprop_check.model.function import FunctionCase, Inputs
from backprop_check.records import Report, Result, Verdict
from backprop_check.engine.runner import TIMEOUT, run
from backprop_check.engine.verdict import UNRESOLVED

_torch_gradcheck = importlib.import_module("torch.autograd.gradcheck")  # the module, not the function

# torch's keywords that have no meaning here, and why (said in one warning line when given).
IGNORED = {
    "eps": "the step is chosen per element",
    "masked": "sparse and masked inputs are not supported",
    "check_batched_forward_grad": "the vmap rule of a jvp is not checked",
    "grad_outputs": "random cotangents are drawn instead, at every point",
    "gen_non_contig_grad_outputs": "the contract's layout item checks non-contiguous inputs",
}
# What torch does when a keyword is not given, for the ones that only matter when switched on.
IGNORED_DEFAULTS = {
    "check_batched_forward_grad": False,
    "grad_outputs": None,
    "gen_non_contig_grad_outputs": False,
}


# fast_mode=False estimates every element by finite differences up to this many differentiated
# elements in all (what torch's slow mode does, in seconds); above it, the default mode, which
# samples elements and weighs every one through random directional derivatives, so that a
# 256×512 layer norm answers in seconds, not minutes (torch's slow mode takes minutes there).
FULL_UP_TO = 4096


class GradcheckError(_torch_gradcheck.GradcheckError):
    """A gradient check failed: a RuntimeError (torch's GradcheckError) carrying the harness's
    message, with the whole `report` and the first failing `result`."""

    def __init__(self, message: str, report: Report, result: Result) -> None:
        super().__init__(message)
        self.report = report
        self.result = result


def gradcheck(
    fn: Callable[..., Any],
    inputs: Inputs,
    *,
    raise_exception: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    nondet_tol: float = 0.0,
    check_undefined_grad: bool = True,
    check_grad_dtypes: bool = True,
    check_batched_grad: bool = False,
    check_forward_ad: bool = False,
    check_backward_ad: bool = True,
    fast_mode: bool = False,
    points: int = 0,
    dtypes: Any = None,
    devices: Any = None,
    seed: int = 0,
    manual: Callable[..., Any] | None = None,
    timeout: float | None = TIMEOUT,
    reference: Callable[..., Any] | None = None,
    contract: Sequence[str] | None = None,
    **torch_options: Any,
) -> bool:
    """True when autograd (and `manual`, if given) agree with the float64 reference and the
    Function keeps its contract; otherwise raise `GradcheckError` (or return False when
    `raise_exception=False`). A broken function (fn raises, returns a non-tensor…) raises
    `CaseError` with one line, whatever `raise_exception` says, as torch lets fn's error through.

    torch's keywords: `atol`/`rtol` replace the harness's tolerance when given (its own is
    tighter and has an error bar: torch's 1e-5/1e-3 defaults are not used); `nondet_tol` is the
    spread two backward passes may have; `check_undefined_grad`, `check_batched_grad` switch
    those contract checks; `check_grad_dtypes` is always on; `check_forward_ad=True` also
    checks forward-mode AD (the Function's `jvp`) against directional finite differences, and
    `check_backward_ad=False` leaves the backward out; `fast_mode=False` (torch's default)
    checks every element up to FULL_UP_TO differentiated elements in all, and above that the
    default mode, as `fast_mode=True` does at any size (sampled elements and random
    directional derivatives that weigh every element, elementwise where they disagree).
    `eps`, `masked` and the other options are ignored, with one warning saying why. Beyond
    torch: `points` random points besides the given inputs (default 0, as torch),
    `dtypes`/`devices` (default: the inputs' own), `seed`, `reference=`: a plain float64
    version of a low-precision kernel to judge it against (`check`'s; the kernel then runs in
    its inputs' dtype only), and `contract=`: the Function contract's items to check (`check`'s;
    default every item but `vmap`, which `check_batched_grad=True` adds), e.g. without
    `repeatable` for a backward that may run only once.
    """
    __tracebackhide__ = True
    if not (check_forward_ad or check_backward_ad):
        raise ValueError("gradcheck: check_forward_ad and check_backward_ad are both False: nothing to check")
    modes = ("rev",) * check_backward_ad + ("fwd",) * check_forward_ad
    return _checked(
        "gradcheck", fn, inputs, torch_options, raise_exception=raise_exception, atol=atol, rtol=rtol,
        nondet_tol=nondet_tol, check_undefined_grad=check_undefined_grad, check_batched_grad=check_batched_grad,
        fast_mode=fast_mode, points=points, dtypes=dtypes, devices=devices, seed=seed, manual=manual,
        timeout=timeout, order=1, modes=modes, reference=reference, contract=contract,
    )


def gradgradcheck(
    fn: Callable[..., Any],
    inputs: Inputs,
    *,
    raise_exception: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    nondet_tol: float = 0.0,
    check_undefined_grad: bool = True,
    check_grad_dtypes: bool = True,
    check_batched_grad: bool = False,
    fast_mode: bool = False,
    points: int = 0,
    dtypes: Any = None,
    devices: Any = None,
    seed: int = 0,
    timeout: float | None = TIMEOUT,
    reference: Callable[..., Any] | None = None,
    check_fwd_over_rev: bool = False,
    check_rev_over_rev: bool = True,
    contract: Sequence[str] | None = None,
    **torch_options: Any,
) -> bool:
    """A drop-in for `torch.autograd.gradgradcheck`: the derivative of the gradient (autograd's
    double backward, with respect to the inputs and to grad_output) against float64 finite
    differences of the first-order gradient, plus the first-order check itself (a wrong
    gradient fails here too, where torch's gradgradcheck would compare the wrong backward with
    its own derivative). The keywords are `gradcheck`'s; `grad_outputs` is ignored (random
    cotangents are drawn), with a warning. `check_fwd_over_rev=True` also checks the
    derivative of the gradient in forward mode (the Functions' `jvp` through their backward),
    `check_rev_over_rev=False` leaves the double backward out, as torch's do.
    """
    __tracebackhide__ = True
    del check_grad_dtypes  # grad_meta always checks dtypes (and device and shape)
    if not (check_fwd_over_rev or check_rev_over_rev):
        raise ValueError("gradgradcheck: check_fwd_over_rev and check_rev_over_rev are both False: nothing to check")
    return _checked(
        "gradgradcheck", fn, inputs, torch_options, raise_exception=raise_exception, atol=atol, rtol=rtol,
        nondet_tol=nondet_tol, check_undefined_grad=check_undefined_grad, check_batched_grad=check_batched_grad,
        fast_mode=fast_mode, points=points, dtypes=dtypes, devices=devices, seed=seed, manual=None,
        timeout=timeout, order=2, modes=("rev",) * check_rev_over_rev + ("fwd",) * check_fwd_over_rev, reference=reference,
        contract=contract,
    )


def _checked(
    what: str,
    fn: Callable[..., Any],
    inputs: Inputs,
    torch_options: dict[str, Any],
    *,
    raise_exception: bool,
    atol: float | None,
    rtol: float | None,
    nondet_tol: float,
    check_undefined_grad: bool,
    check_batched_grad: bool,
    fast_mode: bool,
    points: int,
    dtypes: Any,
    devices: Any,
    seed: int,
    manual: Callable[..., Any] | None,
    timeout: float | None,
    order: int,
    modes: tuple[str, ...],
    reference: Callable[..., Any] | None = None,
    contract: Sequence[str] | None = None,
) -> bool:
    """Run the check and answer as torch's checks do (see gradcheck)."""
    __tracebackhide__ = True
    unknown = sorted(set(torch_options) - set(IGNORED))
    if unknown:
        raise TypeError(f"{what}() got an unexpected keyword argument {unknown[0]!r}")
    ignored = [
        f"{name}= ({IGNORED[name]})"
        for name, value in torch_options.items()
        if name not in IGNORED_DEFAULTS or value is not IGNORED_DEFAULTS[name] and value != IGNORED_DEFAULTS[name]
    ]
    if ignored:
        warnings.warn(f"backprop_check.{what} ignores {', '.join(ignored)}", stacklevel=3)
    if contract is None:
        items = [item for item in ITEMS if item != "vmap" or check_batched_grad]
        if not check_undefined_grad:
            items.remove("undefined_grad")
    else:
        items = list(contract)
    checked = FunctionCase(
        fn, inputs, manual=manual, rtol=rtol, atol=atol, contract=items, nondet_tol=nondet_tol, order=order, modes=modes,
        reference=reference,
    )
    if _nothing_to_check(checked):
        return True
    report = run(
        checked,
        devices=devices or checked.devices,
        dtypes=dtypes or checked.input_dtypes or None,
        points=points,
        seed=seed,
        timeout=timeout,
        full=not fast_mode and _elements(checked) <= FULL_UP_TO,
    )
    skipped = [r for r in report.results if r.verdict == Verdict.SKIPPED]
    if skipped:  # a device asked for by name and missing: nothing was checked there, so no True
        raise CaseError(f"{what}: nothing was checked on {skipped[0].device}: {skipped[0].message}")
    broken = [r for r in report.results if r.verdict == Verdict.ERROR]
    if broken and _no_float_output(checked):  # argmax, a mask: torch's gradcheck has nothing to compare either
        return True
    if broken:
        # The time limit names the CLI's option; here it is this function's keyword.
        raise CaseError(broken[0].message.replace("(--timeout)", f"(timeout= of {what}(), in seconds; None for no limit)"))
    failed = [r for r in report.results if r.verdict == Verdict.MISMATCH]
    # No verdict because the finite differences settle nowhere (a discontinuity at the point, as
    # pinv at a rank-deficient matrix): nothing was confirmed, and torch's gradcheck fails there
    # too. A kink is another matter: the sources agree within its one-sided derivatives.
    failed += [r for r in report.results if r.verdict == Verdict.NONDIFFERENTIABLE and r.message.startswith(UNRESOLVED)]
    if not failed:
        return True
    if not raise_exception:
        return False
    raise GradcheckError(_message(failed[0], report), report, failed[0])


def _elements(checked: FunctionCase) -> int:
    return sum(t.numel() for t in checked.params.values() if isinstance(t, torch.Tensor))


def _no_float_output(checked: FunctionCase) -> bool:
    """fn ran and returned tensors, none of them floating-point or complex (`x.argmax()`): torch's
    gradcheck answers True, with no output to differentiate, and so does the drop-in; `check()`
    and the CLI say that there is no gradient to check (an `error`). Asked only of a check that
    failed to run: fn is called once more."""
    ready = checked.prepared()
    dtypes = ready.output_dtypes
    return bool(ready.broken) and bool(dtypes) and not any(d.is_floating_point or d.is_complex for d in dtypes)


def _nothing_to_check(checked: FunctionCase) -> bool:
    """Every differentiated input is empty (shape (1, 0, 3), (0, 0)): torch's gradcheck answers
    True, having nothing to compare, and so does the drop-in, once fn has run and returned
    tensors; `check()` and the CLI keep saying that nothing was checked (an `error`)."""
    given = [value for name, value in checked.params.items() if isinstance(value, torch.Tensor)]
    if not given or len(given) != len(checked.params) or any(t.numel() for t in given):
        return False
    problem = checked.problem()  # runs fn once: its own errors still come through
    if problem:
        raise CaseError(problem)
    return True


def _message(result: Result, report: Report) -> str:
    """The first failure in words, then the text report's table and hints."""
    table = text.render(Report(results=[r for r in report.results if r.verdict == Verdict.MISMATCH], seconds=report.seconds))
    return f"gradient check of {result.case} failed on {result.device} in {result.dtype}: {result.message}\n\n{table.rstrip()}"
