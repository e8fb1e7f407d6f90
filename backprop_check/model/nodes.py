"""`node(name, tensor)`: marks an intermediate of a forward pass so that dloss/dnode is checked.

Outside a check, `node` returns its tensor untouched. During a check the harness opens a
`Tape`: it records each node (autograd takes dloss/dnode from the recorded tensors) and may add
an offset to it (the numerical source perturbs a node by injecting an offset there).

In a numpy case (`@case(..., numpy=True)`) `node` takes and returns numpy values: the tape
records a copy as a tensor and the offset, a numpy array there, is added to the value.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from backprop_check.errors import CaseError

_tape: ContextVar[Tape | None] = ContextVar("backprop_check_tape", default=None)


class Tape:
    """The nodes one forward pass marked, in the order it marked them."""

    def __init__(self, offsets: Mapping[str, Any] | None = None, *, numpy: bool = False) -> None:
        self.offsets = dict(offsets or {})
        self.values: dict[str, torch.Tensor] = {}
        self.numpy = numpy

    def mark(self, name: str, tensor: Any) -> Any:
        if not isinstance(name, str) or not name:
            raise CaseError(f"node name must be a non-empty string, got {name!r}")
        if self.numpy:
            return self._mark_array(name, tensor)
        if not isinstance(tensor, torch.Tensor):
            raise CaseError(f"node {name!r} must be a torch tensor, got {type(tensor).__name__}")
        if name in self.values:
            raise CaseError(f"node {name!r} is marked twice in one forward pass")
        if tensor.is_complex():
            raise CaseError(
                f"node {name!r} is complex ({tensor.dtype}): nodes are checked as real tensors; "
                "mark a real intermediate (e.g. its .real and .imag, or |z|²) instead"
            )
        if name in self.offsets:
            tensor = tensor + self.offsets[name]
        self.values[name] = tensor
        return tensor

    def _mark_array(self, name: str, value: Any) -> Any:
        from backprop_check.model.arrays import node_value

        if name in self.values:
            raise CaseError(f"node {name!r} is marked twice in one forward pass")
        recorded = node_value(name, value)
        offset = self.offsets.get(name)
        if offset is not None:
            offset = offset.numpy() if isinstance(offset, torch.Tensor) else offset
            value = value + offset
            recorded = recorded + torch.from_numpy(offset)
        self.values[name] = recorded
        return value


def node(name: str, tensor: Any) -> Any:
    """Mark `tensor` as the intermediate `name` of the loss and return it.

    The harness compares dloss/d`name` from the manual gradient (when it returns `name`),
    from autograd and from finite differences, to find the step where a derivation breaks.
    In a numpy case `tensor` is a numpy array or number, and so is what `node` returns.
    """
    tape = _tape.get()
    return tensor if tape is None else tape.mark(name, tensor)


@contextmanager
def recording(offsets: Mapping[str, Any] | None = None, *, numpy: bool = False) -> Iterator[Tape]:
    """Record the nodes of the forward passes run inside the block (adding `offsets`)."""
    tape = Tape(offsets, numpy=numpy)
    token = _tape.set(tape)
    try:
        yield tape
    finally:
        _tape.reset(token)


@contextmanager
def using(tape: Tape) -> Iterator[Tape]:
    """Make an existing `tape` the current one inside the block (the numerical source's numpy
    loop keeps one tape for thousands of forward calls)."""
    token = _tape.set(tape)
    try:
        yield tape
    finally:
        _tape.reset(token)
