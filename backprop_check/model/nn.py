"""`nn.Module` cases: `@case(module=lambda: nn.Linear(3, 1), data=...)`.

The module is built once per check under a seeded global RNG (module constructors draw from
it), its named parameters (`weight`, `bias`, `0.weight`…) become the case's parameters, and the
forward pass receives the module as `model` with those parameters swapped for the tensors being
checked — the same swap `torch.func.functional_call` makes, so it also works under `vmap`.

The built module belongs to the check's points (a `Built` on each `Point`), never to the user's
`Case`: a case checked twice, with two seeds or by two runs at once, builds it twice.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from backprop_check.model.case import Case
from backprop_check.errors import CaseError, one_line

# Module constructors draw from torch's one global RNG: two builds at once (two runs in two
# threads) would draw from each other's seed. fork_rng restores the RNG but does not exclude.
_GLOBAL_RNG = threading.Lock()


class Built:
    """A module case's module, built from `seed`, and its copies per dtype and device.

    The given point makes one; every point drawn from it shares it (the parameters differ from
    point to point, the module's other state does not)."""

    def __init__(self, case: Case, seed: int) -> None:
        self.seed, self._case = seed, case
        self.module = _build(case, seed)
        self._copies: dict[tuple[torch.dtype, str], torch.nn.Module] = {}

    def __repr__(self) -> str:
        return f"Built({type(self.module).__name__}, seed={self.seed})"

    def initial_params(self) -> dict[str, torch.Tensor]:
        """The module's named parameters at the given point, in float64."""
        params = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        if not params:
            raise CaseError("the module has no parameters to differentiate")
        return params

    def placed(self, like: torch.Tensor) -> torch.nn.Module:
        """The module moved to the dtype and device of `like` (buffers too), one copy per pair."""
        key = (like.dtype, str(like.device))
        if key not in self._copies:
            try:
                module = copy.deepcopy(self.module)
            except RuntimeError:  # a tensor that is no leaf held as an attribute (the old hook-based weight_norm)
                module = _build(self._case, self.seed)  # the same module: built from the same seed
            self._copies[key] = module.to(device=like.device, dtype=like.dtype)
        return self._copies[key]


def _build(case: Case, seed: int) -> torch.nn.Module:
    """The case's module, built from `seed`, in float64."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = case.module()  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - user code
            raise CaseError(f"module= raised {one_line(exc)}") from exc
    if not isinstance(module, torch.nn.Module):
        raise CaseError(f"module= must return a torch.nn.Module, got {type(module).__name__}")
    return module.double()


@contextmanager
def bound(module: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """`module` with its parameters replaced by `params` for the duration of the block."""
    saved = []
    try:
        for name, value in params.items():
            owner, leaf = _owner(module, name)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value
        yield module
    finally:
        for owner, leaf, original in reversed(saved):
            owner._parameters[leaf] = original


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if leaf not in owner._parameters:
        raise CaseError(f"the module has no parameter {name!r}")
    return owner, leaf
