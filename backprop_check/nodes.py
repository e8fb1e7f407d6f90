"""`node(name, tensor)`: marks an intermediate of a forward pass so that dloss/dnode is checked.

Outside a check, `node` returns its tensor untouched. During a check the harness opens a
`Tape`: it records each node (autograd takes dloss/dnode from the recorded tensors) and may add
an offset to it (the numerical source perturbs a node by injecting an offset there).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .errors import CaseError

_tape: ContextVar[Tape | None] = ContextVar("backprop_check_tape", default=None)


class Tape:
    """The nodes one forward pass marked, in the order it marked them."""

    def __init__(self, offsets: Mapping[str, torch.Tensor] | None = None) -> None:
        self.offsets = dict(offsets or {})
        self.values: dict[str, torch.Tensor] = {}

    def mark(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(name, str) or not name:
            raise CaseError(f"node name must be a non-empty string, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise CaseError(f"node {name!r} must be a torch tensor, got {type(tensor).__name__}")
        if name in self.values:
            raise CaseError(f"node {name!r} is marked twice in one forward pass")
        if name in self.offsets:
            tensor = tensor + self.offsets[name]
        self.values[name] = tensor
        return tensor


def node(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Mark `tensor` as the intermediate `name` of the loss and return it.

    The harness compares dloss/d`name` from the manual gradient (when it returns `name`),
    from autograd and from finite differences, to find the step where a derivation breaks.
    """
    tape = _tape.get()
    return tensor if tape is None else tape.mark(name, tensor)


@contextmanager
def recording(offsets: Mapping[str, torch.Tensor] | None = None) -> Iterator[Tape]:
    """Record the nodes of the forward passes run inside the block (adding `offsets`)."""
    tape = Tape(offsets)
    token = _tape.set(tape)
    try:
        yield tape
    finally:
        _tape.reset(token)
