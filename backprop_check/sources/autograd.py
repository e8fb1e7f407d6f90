"""The autograd source: `torch.autograd.grad` on the forward pass (never accumulating into
`.grad`); a parameter the loss does not use has gradient zero."""
from __future__ import annotations

from dataclasses import replace

import torch

from backprop_check.model.case import Case
from backprop_check.errors import CaseError, one_line, raised_at
from backprop_check.model.forward import call_forward
from backprop_check.model.points import Point
from backprop_check.sources import Gradients


def gradient(case: Case, point: Point, device: str, dtype: torch.dtype) -> Gradients:
    """dloss/dparam and dloss/dnode by autograd, in `dtype` on `device`."""
    at = point.cast(dtype, device)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in at.params.items()}
    with torch.enable_grad():
        loss, tape = call_forward(case, replace(at, params=params))
        inputs = {**params, **tape.values}
        if not loss.requires_grad:
            grads = [None] * len(inputs)
        else:
            try:
                grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
            except CaseError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch's RuntimeError, or anything a custom Function's backward raises
                failure = getattr(case, "describe_failure", None)
                raise CaseError(failure(exc) if failure else f"autograd failed: {one_line(exc)}{raised_at(exc)}") from exc
    values = {name: dense(g, t) for (name, t), g in zip(inputs.items(), grads)}
    return Gradients("autograd", values, loss=loss.detach(), nodes=tuple(tape.values))


def dense(gradient: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A gradient as a plain tensor: zeros for None, and for a ZeroTensor (what `torch.sgn`'s
    backward can return), whose storage is never allocated and cannot be read."""
    if gradient is None or gradient._is_zerotensor():
        return torch.zeros(like.shape, dtype=gradient.dtype if gradient is not None else like.dtype, device=like.device)
    return gradient.detach()
