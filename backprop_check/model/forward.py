"""Running a case's forward pass: user code in, a checked scalar loss and its nodes out.

A numpy case (`numpy=True`) receives numpy arrays and returns a number (see arrays.py); the
loss still comes out as a 0-d tensor, so the sources downstream never know the difference.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from typing import Any

import numpy as np
import torch

from backprop_check.model import complexes
from backprop_check.model.arrays import as_arrays, numpy_loss
from backprop_check.model.case import Case
from backprop_check.errors import CaseError, line_in, one_line
from backprop_check.model.nn import bound
from backprop_check.model.nodes import Tape, recording
from backprop_check.model.points import Point


def call_forward(
    case: Case, at: Point, offsets: Mapping[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, Tape]:
    """Run the forward pass at `at` (its parameters and data, as they are: a caller that feeds
    other values passes `replace(at, params=...)`); return the scalar loss (shape ()) and the
    nodes it marked."""
    # Gradients stay on inside the forward, whoever calls it (the numerical source runs under
    # no_grad): a gradient penalty differentiates inside it. Nothing records unless the forward
    # itself makes a tensor that requires grad, so this costs the other cases nothing.
    wanted = torch.is_grad_enabled()
    with recording(offsets, numpy=case.numpy) as tape, arguments(case, at) as kwargs, torch.enable_grad():
        loss = call_user(case, "forward", case.forward, kwargs)
    if case.numpy:
        return numpy_loss(loss), tape
    loss = as_loss(loss)
    return (loss if wanted else loss.detach()), tape


@contextmanager
def arguments(case: Case, at: Point) -> Iterator[dict[str, object]]:
    """The keyword arguments of the forward (and manual) function at `at`: every parameter and
    datum, or for a module case the point's module as `model` (its parameters bound to the
    point's) and the data; numpy arrays for a numpy case. A complex value, kept as its real view,
    is handed over as the complex tensor viewing it (complexes.py): what autograd finds for it
    reaches the real view."""
    if case.numpy:
        yield {**as_arrays(at.params), **as_arrays(at.data)}
        return
    if case.module is None:
        yield complexes.for_user({**at.params, **at.data}, at.complex)
        return
    if at.module is None:  # a point made by hand without `replace`: never guess a seed
        raise ValueError(f"{at.describe()} of module case {case.name!r} carries no module")
    module = at.module.placed(next(iter(at.params.values())))
    with bound(module, at.params):
        yield {"model": module, **complexes.for_user(at.data, at.complex)}


def call_user(case: Case, what: str, fn, kwargs: Mapping[str, object]):  # noqa: ANN001, ANN201
    """Call the user's `fn`; anything it raises becomes a one-line `CaseError`."""
    try:
        return fn(**kwargs)
    except CaseError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise anything, even exit()
        raise user_error(case, what, exc) from exc


def user_error(case: Case, what: str, exc: BaseException) -> CaseError:
    """What the user's code raised, as one line naming the line of the case file."""
    line = line_in(case.file, exc)
    at = f" (line {line})" if line else ""
    return CaseError(f"{what} raised {one_line(exc)}{at}")


def as_loss(loss: object) -> torch.Tensor:
    """The loss as a 0-d tensor; a non-tensor or a non-scalar is a broken case."""
    if isinstance(loss, (np.ndarray, np.generic)):
        raise CaseError(
            f"the forward pass returned a numpy {type(loss).__name__}, not a torch tensor: for a forward "
            "written in numpy, use @case(..., numpy=True) (checked manual against numerical)"
        )
    if not isinstance(loss, torch.Tensor):
        raise CaseError(
            f"the forward pass returned {type(loss).__name__}, not a torch tensor: "
            "autograd cannot differentiate it"
        )
    if loss.numel() != 1:
        raise CaseError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    if loss.is_complex():
        raise CaseError(
            f"the loss must be real, got {loss.dtype}: a complex number has no order to minimise; "
            "return a real loss such as z.abs()**2 or z.real"
        )
    if not loss.is_floating_point():
        raise CaseError(f"the loss must be a float tensor, got {loss.dtype}")
    return loss.reshape(())


def outputs(case: Case, at: Point) -> tuple[Any, ...]:
    """What forward mode differentiates at `at`: a case's loss; a kind of case with outputs of
    its own (a function check: fn's floating outputs; a derivative: the gradient) says them."""
    own = getattr(case, "outputs", None)
    return own(at) if own is not None else (call_forward(case, at)[0],)
