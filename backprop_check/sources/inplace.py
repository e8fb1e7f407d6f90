"""The numerical source's loop for a numpy forward: each element perturbed in place.

A numpy forward cannot be batched with `torch.func.vmap`, so its finite differences are one
forward call per perturbation. This loop adds nothing to a call beyond the user's function:
the arguments are float64 numpy arrays built once, one element is set to θ + t·h, the forward
runs, the element is restored (θ ± h is exact: h is a power of two), and the loss is read as a
float. No tensor rows, no argument dicts, no tape of node values: a node is perturbed through
its own offset array, changed in place the same way. The values are those the generic loop
computes, bit for bit (tests/test_numpy.py compares them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backprop_check.model.arrays import as_array, loss_value
from backprop_check.model.case import Case
from backprop_check.errors import CaseError
from backprop_check.model.forward import user_error
from backprop_check.model.nodes import Tape, using
from backprop_check.model.points import Point

if TYPE_CHECKING:
    from backprop_check.sources.batches import Flat


class _Offsets(Tape):
    """A tape that adds the offset of the node being perturbed and records nothing else."""

    def _mark_array(self, name: str, value: Any) -> Any:
        if name in self.values:
            raise CaseError(f"node {name!r} is marked twice in one forward pass")
        self.values[name] = None  # type: ignore[assignment] - only the name matters here
        offset = self.offsets.get(name)
        return value if offset is None else value + offset


class InPlace:
    """The loss of a numpy case at a point, for values of its parameters and node offsets
    changed in place; the numerical source's `Batched` for numpy forwards."""

    note: str | None = None

    def __init__(self, case: Case, at: Point, nodes: Mapping[str, torch.Tensor]) -> None:
        self.case = case
        # Private, contiguous float64 copies: `reshape(-1)` below is then a view of each.
        self.targets = {name: np.array(as_array(name, v), dtype=np.float64, order="C") for name, v in at.params.items()}
        self.targets |= {name: np.zeros(tuple(v.shape), dtype=np.float64) for name, v in nodes.items()}
        self.flat = {name: array.reshape(-1) for name, array in self.targets.items()}
        self.nodes = set(nodes)
        data = {name: np.array(as_array(name, v), order="C") for name, v in at.data.items()}
        self.kwargs = {**{name: self.targets[name] for name in at.params}, **data}
        self.tape = _Offsets(numpy=True)

    def elements(self, flat: Flat, h: torch.Tensor, index: torch.Tensor, offsets: Sequence[float]) -> torch.Tensor:
        """The loss at θ + t·h for each t in `offsets` and each flat element in `index`, as a
        (len(offsets), flat.size) matrix (NaN for elements not in `index`)."""
        f = np.full((len(offsets), flat.size), np.nan)
        steps = h.numpy()
        wanted = np.sort(index.numpy())
        with using(self.tape):
            for name, part in flat.slices.items():
                mine = wanted[(wanted >= part.start) & (wanted < part.stop)]
                target = self.flat[name]
                self.tape.offsets = {name: self.targets[name]} if name in self.nodes else {}
                for j in mine.tolist():
                    theta = target[j - part.start]
                    try:
                        for k, t in enumerate(offsets):
                            target[j - part.start] = theta + t * steps[j]
                            f[k, j] = self._loss()
                    finally:
                        target[j - part.start] = theta
        self.tape.offsets = {}
        return torch.from_numpy(f)

    def __call__(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        """The loss for each row of `batch`, a flat vector of the arrays in `flat` (directional
        derivatives of a sampled tensor: many elements move at once)."""
        saved = {name: self.targets[name].copy() for name in flat.slices}
        self.tape.offsets = {name: self.targets[name] for name in flat.slices if name in self.nodes}
        losses = []
        try:
            with using(self.tape):
                for row in batch.detach().to(torch.float64).numpy():
                    for name, part in flat.slices.items():
                        self.flat[name][:] = row[part]
                    losses.append(self._loss())
        finally:
            for name, values in saved.items():
                self.targets[name][...] = values
            self.tape.offsets = {}
        return torch.tensor(losses, dtype=torch.float64)

    def _loss(self) -> float:
        """One forward call at the arrays' current values (the tape already in use)."""
        self.tape.values.clear()
        try:
            loss = self.case.forward(**self.kwargs)
        except CaseError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise anything
            raise user_error(self.case, "forward", exc) from exc
        return loss_value(loss)
