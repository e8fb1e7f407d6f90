"""backprop_check: cross-check hand-derived, numerical and autograd gradients against PyTorch."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Imported now, since they import no torch. `case` is also the name of a submodule: binding the
# decorator here keeps `from backprop_check import case` the decorator, whatever imports later.
from .case import Case, case
from .errors import CaseError, CaseLoadError, CaseTimeout, UsageError

__version__ = "0.1.0"

# These import torch (~2 s), so they load on first use: the pytest plugin is loaded by every
# pytest process in an environment that has the package, xdist's controller included, and only
# a process that checks a case needs torch.
_LAZY = {
    "FunctionCase": "function",
    "GradcheckError": "dropin",
    "Report": "report",
    "Result": "report",
    "assert_gradients": "assertions",
    "check": "function",
    "function_case": "function",
    "gradcheck": "dropin",
    "check_layer": "layers",
    "layer": "layers",
    "node": "nodes",
    "run": "runner",
}

if TYPE_CHECKING:
    from .assertions import assert_gradients
    from .dropin import GradcheckError, gradcheck
    from .function import FunctionCase, check, function_case
    from .layers import check_layer, layer
    from .nodes import node
    from .report import Report, Result
    from .runner import run


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
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
    "layer",
    "node",
    "run",
]
