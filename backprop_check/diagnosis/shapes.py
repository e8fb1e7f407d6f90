"""A manual gradient of the wrong shape that a derivation slip explains, diagnosed once.

Two slips give a gradient the wrong shape: a matrix chain multiplied in the wrong order (the
transpose of the parameter's shape), and per-sample gradients left unreduced over the batch
(an extra leading dimension, or a dimension the parameter keeps as 1). `shape_slip` finds the
slip and whether undoing it gives the reference; the comparison's message states the finding
(`ShapeSlip.fact`) and the hint says why the derivation must do otherwise (`ShapeSlip.remedy`),
so neither repeats the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from backprop_check import dtypes


class Slip(str, Enum):
    """What was left undone: a transpose, a sum over the batch, a mean over the batch; or a shape
    no such slip explains (a sum over the wrong axis)."""

    TRANSPOSE = "transpose"
    SUM = "sum"
    MEAN = "mean"
    OTHER = "other"


@dataclass(frozen=True)
class ShapeSlip:
    """A wrong shape `got` (the parameter's is `want`) and the slip behind it; `matches`: once
    undone (transposed, summed or averaged over the `batch` samples), it equals the reference."""

    slip: Slip
    got: tuple[int, ...]
    want: tuple[int, ...]
    matches: bool
    batch: int = 1

    def fact(self) -> str:
        """The comparison's message: the shape, the slip it shows, and whether undoing it fits."""
        if self.slip is Slip.TRANSPOSE:
            fits = "; transposed, it matches the reference" if self.matches else ""
            return f"manual gradient has shape {self.got}, the transpose of {self.want}{fits}"
        if self.slip is Slip.MEAN:
            return (
                f"manual gradient has shape {self.got}, expected {self.want}: a missing mean over the batch "
                "dimension; averaged over it, it matches the reference"
            )
        if self.slip is Slip.OTHER:
            return (
                f"manual gradient has shape {self.got}, expected {self.want} (a gradient has the shape of its "
                "parameter): no transpose or sum over a batch dimension explains it (a sum over the wrong axis? a slice?)"
            )
        fits = "; summed over it, it matches the reference" if self.matches else ""
        return f"manual gradient has shape {self.got}, expected {self.want}: a missing sum over the batch dimension{fits}"

    def remedy(self, name: str) -> str | None:
        """The hint: the rule of the chain rule that the derivation of dloss/`name` broke
        (None unless undoing the slip gives the reference: then the slip is only a guess)."""
        if not self.matches:
            return None
        if self.slip is Slip.TRANSPOSE:
            return (
                f"a gradient has the shape of its parameter: multiply the chain for the manual dloss/d{name} in "
                "the other order (for h = W·x, dloss/dW = δ·xᵀ)"
            )
        if self.slip is Slip.MEAN:
            return f"the loss is a mean over the {self.batch} samples, so dloss/d{name} is the mean of their per-sample shares"
        return f"{name} is shared by all {self.batch} samples, so dloss/d{name} is the sum of their per-sample shares"


def shape_slip(value: torch.Tensor, reference: torch.Tensor) -> ShapeSlip:
    """The slip that explains `value`'s shape against `reference`'s (a whole gradient: every
    element known), or Slip.OTHER when none does. The two match within the hint tolerance of the
    coarser of their dtypes."""
    got, want = tuple(value.shape), tuple(reference.shape)
    rtol = max(dtypes.row(str(value.dtype)).hint_rtol, dtypes.row(str(reference.dtype)).hint_rtol)
    ref = reference.detach().to("cpu", torch.float64)
    val = value.detach().to("cpu", torch.float64)
    if len(got) == 2 and got == want[::-1]:
        return ShapeSlip(Slip.TRANSPOSE, got, want, _close(val.T, ref, rtol))
    extra = len(got) - len(want)
    kept = [i for i, (g, w) in enumerate(zip(got, want)) if w == 1 and g > 1]
    if extra == 0 and kept and all(g == w or i in kept for i, (g, w) in enumerate(zip(got, want))):
        batch = math.prod(got[i] for i in kept)
        summed = val.sum(dim=tuple(kept), keepdim=True)  # a batch dimension the parameter keeps as 1
    elif extra > 0 and got[extra:] == want:
        batch = math.prod(got[:extra])
        summed = val.sum(dim=tuple(range(extra)))
    else:
        return ShapeSlip(Slip.OTHER, got, want, False)
    if not _close(summed, ref, rtol) and _close(summed / batch, ref, rtol):
        return ShapeSlip(Slip.MEAN, got, want, True, batch)
    return ShapeSlip(Slip.SUM, got, want, _close(summed, ref, rtol), batch)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Every element within rtol of its own size and of the tensor's largest (NaN: not close)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(((a - b).abs() <= rtol * b.abs() + rtol * scale + 1e-300).all())
