"""`gradcheck`: a drop-in for `torch.autograd.gradcheck`, so a test suite switches with one
import line:

    from backprop_check import gradcheck        # was: from torch.autograd import gradcheck
    assert gradcheck(MyFn.apply, (x, w))

Like torch's, it checks the given inputs only, in their own dtype and on their device, and
returns True when everything agrees. Unlike torch's, its reference has an error bar (so a
float32 input is judged fairly), its cotangents are random, it checks the custom-Function
contract, and a failure says which source is wrong, for which output and input, at which
element, with the three values and the tolerance.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

from backprop_check.diagnosis import contract
from backprop_check.errors import CaseError
from backprop_check.formats import text
from backprop_check.model.function import FunctionCase, Inputs
from backprop_check.records import Report, Result, Verdict
from backprop_check.engine.runner import TIMEOUT, run

_torch_gradcheck = importlib.import_module("torch.autograd.gradcheck")  # the module, not the function

# torch's keywords that have no meaning here, and why (said in one warning line when given).
IGNORED = {
    "eps": "the step is chosen per element",
    "masked": "sparse and masked inputs are not supported",
    "check_forward_ad": "forward-mode AD is not checked yet",
    "check_batched_forward_grad": "forward-mode AD is not checked yet",
    "check_backward_ad": "the backward is always checked",
}
# What torch does when a keyword is not given, for the ones that only matter when switched on.
IGNORED_DEFAULTS = {"check_forward_ad": False, "check_batched_forward_grad": False, "check_backward_ad": True}


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
    fast_mode: bool = False,
    points: int = 0,
    dtypes: Any = None,
    devices: Any = None,
    seed: int = 0,
    manual: Callable[..., Any] | None = None,
    timeout: float | None = TIMEOUT,
    **torch_options: Any,
) -> bool:
    """True when autograd (and `manual`, if given) agree with the float64 reference and the
    Function keeps its contract; otherwise raise `GradcheckError` (or return False when
    `raise_exception=False`). A broken function (fn raises, returns a non-tensor…) raises
    `CaseError` with one line, whatever `raise_exception` says, as torch lets fn's error through.

    torch's keywords: `atol`/`rtol` replace the harness's tolerance when given (its own is
    tighter and has an error bar: torch's 1e-5/1e-3 defaults are not used); `nondet_tol` is the
    spread two backward passes may have; `check_undefined_grad`, `check_batched_grad` switch
    those contract checks; `check_grad_dtypes` is always on; `fast_mode=False` (torch's
    default) checks every element, `True` the sampled default mode (random directional
    derivatives, elementwise where they disagree). `eps`, `masked` and forward-mode options
    are ignored, with one warning saying why. Beyond torch: `points` random points besides the
    given inputs (default 0, as torch), `dtypes`/`devices` (default: the inputs' own), `seed`.
    """
    __tracebackhide__ = True
    unknown = sorted(set(torch_options) - set(IGNORED))
    if unknown:
        raise TypeError(f"gradcheck() got an unexpected keyword argument {unknown[0]!r}")
    ignored = [
        f"{name}= ({IGNORED[name]})"
        for name, value in torch_options.items()
        if name not in IGNORED_DEFAULTS or value != IGNORED_DEFAULTS[name]
    ]
    if ignored:
        warnings.warn(f"backprop_check.gradcheck ignores {', '.join(ignored)}", stacklevel=2)
    items = [item for item in contract.ITEMS if item != "vmap" or check_batched_grad]
    if not check_undefined_grad:
        items.remove("undefined_grad")
    del check_grad_dtypes  # grad_meta always checks dtypes (and device and shape)
    checked = FunctionCase(fn, inputs, manual=manual, rtol=rtol, atol=atol, contract=items, nondet_tol=nondet_tol)
    report = run(
        checked,
        devices=devices or checked.devices,
        dtypes=dtypes or checked.input_dtypes or None,
        points=points,
        seed=seed,
        timeout=timeout,
        full=not fast_mode,
    )
    broken = [r for r in report.results if r.verdict == Verdict.ERROR]
    if broken:
        raise CaseError(broken[0].message)
    failed = [r for r in report.results if r.verdict == Verdict.MISMATCH]
    if not failed:
        return True
    if not raise_exception:
        return False
    raise GradcheckError(_message(failed[0], report), report, failed[0])


def _message(result: Result, report: Report) -> str:
    """The first failure in words, then the text report's table and hints."""
    table = text.render(Report(results=[r for r in report.results if r.verdict == Verdict.MISMATCH], seconds=report.seconds))
    return f"gradient check of {result.case} failed on {result.device} in {result.dtype}: {result.message}\n\n{table.rstrip()}"
