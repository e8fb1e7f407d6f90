"""The three gradient sources. Each is one function of the same shape,
`(case, point, device, dtype) -> Gradients`; the comparison never knows which model it sees."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..case import Case
from ..points import Point


@dataclass
class Gradients:
    """dloss/dname for every parameter (and named node) from one source.

    The numerical source also gives, per element, an error bar and the one-sided derivatives
    (`left`, `right`) with a mask of the elements that sit on a kink.
    """

    source: str
    values: dict[str, torch.Tensor]
    loss: torch.Tensor | None = None
    error: dict[str, torch.Tensor] = field(default_factory=dict)
    left: dict[str, torch.Tensor] = field(default_factory=dict)
    right: dict[str, torch.Tensor] = field(default_factory=dict)
    kink: dict[str, torch.Tensor] = field(default_factory=dict)
    nodes: tuple[str, ...] = ()
    note: str | None = None


Source = Callable[[Case, Point, str, torch.dtype], Gradients]

from . import autograd, manual, numerical  # noqa: E402 - they import Gradients from here

SOURCES: dict[str, Source] = {
    "manual": manual.gradient,
    "numerical": numerical.gradient,
    "autograd": autograd.gradient,
}
