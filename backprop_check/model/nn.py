"""`nn.Module` cases: `@case(module=lambda: nn.Linear(3, 1), data=...)`.

The module is built once per seed under a seeded global RNG (module constructors draw from it),
its named parameters (`weight`, `bias`, `0.weight`…) become the case's parameters, and the
forward pass receives the module as `model` with those parameters swapped for the tensors being
checked — the same swap `torch.func.functional_call` makes, so it also works under `vmap`.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from backprop_check.model.case import Case
from backprop_check.errors import CaseError, one_line


def build(case: Case, seed: int) -> torch.nn.Module:
    """The case's module, built from `seed` (cached on the case: one build per seed)."""
    built: dict[int, torch.nn.Module] = case.__dict__.setdefault("_modules", {})
    if seed not in built:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                module = case.module()  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - user code
                raise CaseError(f"module= raised {one_line(exc)}") from exc
        if not isinstance(module, torch.nn.Module):
            raise CaseError(f"module= must return a torch.nn.Module, got {type(module).__name__}")
        built[seed] = module.double()
    return built[seed]


def initial_params(case: Case, seed: int) -> dict[str, torch.Tensor]:
    """The module's named parameters at the given point, in float64."""
    params = {name: p.detach().clone() for name, p in build(case, seed).named_parameters()}
    if not params:
        raise CaseError("the module has no parameters to differentiate")
    return params


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


def placed(case: Case, seed: int, like: torch.Tensor) -> torch.nn.Module:
    """The module moved to the dtype and device of `like` (buffers too), cached per pair."""
    copies: dict[tuple[int, torch.dtype, str], torch.nn.Module] = case.__dict__.setdefault("_placed", {})
    key = (seed, like.dtype, str(like.device))
    if key not in copies:
        copies[key] = copy.deepcopy(build(case, seed)).to(device=like.device, dtype=like.dtype)
    return copies[key]


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if leaf not in owner._parameters:
        raise CaseError(f"the module has no parameter {name!r}")
    return owner, leaf
