"""The gradient sources. Each is one function of the same shape, `(case, point, device, dtype) ->
Gradients`, and the comparison never knows which model it sees. The two that are checked,
manual and autograd, are registered in SOURCES; the numerical one is the referee they are
checked against, and the engine asks it through its own entries (`numerical.reference`: the
gradients, then `refine` and `locate` the elements a verdict hangs on; `numerical.along` for
forward mode), with `numerical.gradient` the plain source shape, every element estimated."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from backprop_check.model.case import Case
from backprop_check.model.points import Point


RANDOM = "a random direction"  # what a Direction is, unless it says otherwise


@dataclass(frozen=True)
class Direction:
    """A numerical directional derivative: dloss along `vector`, with its error bar; on a kink
    along it, the one-sided derivatives `left` and `right` bound every subgradient's."""

    vector: torch.Tensor
    value: float
    error: float
    kink: bool
    left: float = float("nan")
    right: float = float("nan")
    step: float = 1.0  # the step multiplier the estimate was taken at
    what: str = RANDOM  # how a report names it: "the tied elements x[0], x[3] moved together" (`with_ties`)


@dataclass
class Gradients:
    """dloss/dname for every parameter (and named node) from one source.

    The numerical source also gives, per element, an error bar and the one-sided derivatives
    (`left`, `right`) with a mask of the elements that sit on a kink; for a large tensor it may
    estimate only the elements in `checked`, plus `directions`.
    """

    def copy(self) -> Gradients:
        """A copy whose dicts can be changed without changing this one (tensors are shared)."""
        return replace(
            self,
            values=dict(self.values),
            error=dict(self.error),
            left=dict(self.left),
            right=dict(self.right),
            kink=dict(self.kink),
            unresolved=dict(self.unresolved),
            checked=dict(self.checked),
            directions=dict(self.directions),
        )

    source: str
    values: dict[str, torch.Tensor]
    loss: torch.Tensor | None = None
    error: dict[str, torch.Tensor] = field(default_factory=dict)
    left: dict[str, torch.Tensor] = field(default_factory=dict)
    right: dict[str, torch.Tensor] = field(default_factory=dict)
    kink: dict[str, torch.Tensor] = field(default_factory=dict)
    # Where the bar is not the forward's rounding (`stencil.settle`: steps that never agreed, or a
    # bar that is mostly truncation: the function is not smooth at the step's scale). Beyond the
    # values, such a bar confirms nothing (engine/compare.py, `_vacuous`).
    unresolved: dict[str, torch.Tensor] = field(default_factory=dict)
    # Sampled tensors: which elements were estimated, and directional derivatives.
    checked: dict[str, torch.Tensor] = field(default_factory=dict)
    directions: dict[str, list[Direction]] = field(default_factory=dict)
    nodes: tuple[str, ...] = ()
    note: str | None = None


Source = Callable[[Case, Point, str, torch.dtype], Gradients]


def largest_gradient(source: Gradients | None, params: list[str]) -> float:
    """The largest finite |dloss/dparam| at the point: the scale of its rounding floor."""
    largest = 0.0
    for name in params:
        if source is None or name not in source.values:
            continue
        value = source.values[name].detach()
        if value.numel() and value.dtype in (torch.float64, torch.float32) and value.device.type == "cpu":
            # the same in numpy, whose ops on a few elements cost a fraction of torch's
            magnitude = np.abs(value.numpy())
            largest = max(largest, float(np.where(np.isfinite(magnitude), magnitude, 0.0).max()))
        elif value.numel():  # |value| where finite, 0 elsewhere: its largest is the largest finite one
            largest = max(largest, float(torch.where(torch.isfinite(value), value.abs(), 0.0).max()))
    return largest


from backprop_check.sources import autograd  # noqa: E402 - they import Gradients from here
from backprop_check.sources import manual

SOURCES: dict[str, Source] = {
    "manual": manual.gradient,
    "autograd": autograd.gradient,
}
