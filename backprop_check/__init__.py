"""backprop_check: cross-check hand-derived, numerical and autograd gradients against PyTorch."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Imported now, since they import no torch.
from backprop_check.errors import CaseError, CaseLoadError, CaseTimeout, UsageError
from backprop_check.model.case import Case, case
from backprop_check.version import __version__  # noqa: F401 - the package's version


# These import torch (~2 s), so they load on first use: the pytest plugin is loaded by every
# pytest process in an environment that has the package, xdist's controller included, and only
# a process that checks a case needs torch.
_LAZY = {
    "FunctionCase": "model.function",
    "GradcheckError": "commands.dropin",
    "Report": "records",
    "Result": "records",
    "assert_gradients": "commands.assertions",
    "check": "commands.api",
    "function_case": "commands.api",
    "gradcheck": "commands.dropin",
    "gradgradcheck": "commands.dropin",
    "check_layer": "commands.api",
    "layer": "model.layers",
    "node": "model.nodes",
    "run": "engine.runner",
}

# What hands back a Report (or raises with one): the notebook view (formats, records.VIEWS) is
# registered when one of these is first used, not for `Report` or `node` alone, which need no torch.
_CHECKS = {"assert_gradients", "check", "check_layer", "gradcheck", "gradgradcheck", "run"}

if TYPE_CHECKING:
    from backprop_check.commands.assertions import assert_gradients
    from backprop_check.commands.dropin import GradcheckError, gradcheck, gradgradcheck
    from backprop_check.commands.api import check, check_layer, function_case
    from backprop_check.model.function import FunctionCase
    from backprop_check.model.layers import layer
    from backprop_check.model.nodes import node
    from backprop_check.records import Report, Result
    from backprop_check.engine.runner import run


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _CHECKS:  # they import torch anyway; the formats register how a Report shows in a notebook
        import_module(".formats", __name__)
    globals()[name] = value
    return value


__all__ = [
    "Case",
    "CaseError",
    "CaseLoadError",
    "CaseTimeout",
    "FunctionCase",
    "GradcheckError",
    "Report",
    "Result",
    "UsageError",
    "assert_gradients",
    "case",
    "check",
    "check_layer",
    "function_case",
    "gradcheck",
    "gradgradcheck",
    "layer",
    "node",
    "run",
]
