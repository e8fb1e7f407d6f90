"""`assert_gradients`: the harness inside an ordinary test.

    def test_linear():
        assert_gradients(lambda w, x: (w * x - 2) ** 2, params={"w": 1.0}, data={"x": 1.0},
                         manual=lambda w, x: {"w": 2 * (w * x - 2) * x})

builds a Case from the arguments, checks it (on the CPU unless `devices` says otherwise) and
raises an AssertionError carrying the text report's table when a gradient disagrees or the
case is broken.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from backprop_check.model.case import case
from backprop_check.formats import text
from backprop_check.records import Report, Verdict
from backprop_check.engine.runner import TIMEOUT, run


def assert_gradients(
    fn: Callable[..., Any],
    *,
    params: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    manual: Callable[..., Mapping[str, Any]] | None = None,
    devices: Sequence[str] = ("cpu",),
    dtypes: Sequence[str] | None = None,
    points: int | None = None,
    seed: int = 0,
    timeout: float | None = TIMEOUT,
    **case_options: Any,
) -> Report:
    """Check `fn`'s gradients (manual, if given, against numerical and autograd) and return the
    Report; raise AssertionError with the mismatch table on a mismatch or a broken case.

    `case_options` are `@case`'s other keywords: `expect`, `sample`, `rtol`, `atol`, `name`,
    `module`.
    """
    __tracebackhide__ = True
    checked = case(fn, params=params, data=data, **case_options)
    if manual is not None:
        checked.manual(manual)
    report = run(checked, devices=devices, dtypes=dtypes, points=points, seed=seed, timeout=timeout)
    if report.exit_code:
        verdicts = ", ".join(f"{count} {verdict}" for verdict, count in report.summary.items() if count and verdict in (Verdict.MISMATCH, Verdict.ERROR))
        verdicts = verdicts or str(report.not_checked)
        raise AssertionError(f"gradients of {checked.name!r}: {verdicts}\n\n{text.render(report).rstrip()}")
    return report
