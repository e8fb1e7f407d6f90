"""Running a case's forward pass: user code in, a checked scalar loss and its nodes out."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .case import Case
from .errors import CaseError, line_in, one_line
from .nodes import Tape, recording


def call_forward(
    case: Case,
    params: Mapping[str, torch.Tensor],
    data: Mapping[str, torch.Tensor],
    offsets: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Tape]:
    """Run the forward pass; return the scalar loss (shape ()) and the nodes it marked."""
    with recording(offsets) as tape:
        loss = call_user(case, "forward", case.forward, {**params, **data})
    return as_loss(loss), tape


def call_user(case: Case, what: str, fn, kwargs: Mapping[str, object]):  # noqa: ANN001, ANN201
    """Call the user's `fn`; anything it raises becomes a one-line `CaseError`."""
    try:
        return fn(**kwargs)
    except CaseError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        line = line_in(case.file, exc)
        at = f" (line {line})" if line else ""
        raise CaseError(f"{what} raised {one_line(exc)}{at}") from exc


def as_loss(loss: object) -> torch.Tensor:
    """The loss as a 0-d tensor; a non-tensor or a non-scalar is a broken case."""
    if not isinstance(loss, torch.Tensor):
        raise CaseError(
            f"the forward pass returned {type(loss).__name__}, not a torch tensor: "
            "autograd cannot differentiate it"
        )
    if loss.numel() != 1:
        raise CaseError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise CaseError(f"the loss must be a float tensor, got {loss.dtype}")
    return loss.reshape(())
