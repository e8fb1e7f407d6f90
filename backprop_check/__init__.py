"""backprop_check: cross-check hand-derived, numerical and autograd gradients against PyTorch."""
from __future__ import annotations

from .assertions import assert_gradients
from .case import Case, case
from .errors import CaseError, CaseLoadError, CaseTimeout, UsageError
from .function import FunctionCase, check, function_case
from .gradcheck import GradcheckError, gradcheck
from .nodes import node
from .report import Report, Result
from .runner import run

__version__ = "0.1.0"

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
    "function_case",
    "gradcheck",
    "node",
    "run",
]
