"""The autograd source: `torch.autograd.grad` on the forward pass (never accumulating into
`.grad`); a parameter the loss does not use has gradient zero."""
from __future__ import annotations

import torch

from ..case import Case
from ..errors import CaseError, one_line
from ..forward import call_forward
from ..points import Point
from . import Gradients


def gradient(case: Case, point: Point, device: str, dtype: torch.dtype) -> Gradients:
    """dloss/dparam and dloss/dnode by autograd, in `dtype` on `device`."""
    at = point.cast(dtype, device)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in at.params.items()}
    with torch.enable_grad():
        loss, tape = call_forward(case, params, at.data)
        inputs = {**params, **tape.values}
        if not loss.requires_grad:
            grads = [None] * len(inputs)
        else:
            try:
                grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
            except RuntimeError as exc:
                raise CaseError(f"autograd failed: {one_line(exc)}") from exc
    values = {
        name: (g if g is not None else torch.zeros_like(t)).detach()
        for (name, t), g in zip(inputs.items(), grads)
    }
    return Gradients("autograd", values, loss=loss.detach(), nodes=tuple(tape.values))
