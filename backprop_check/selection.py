"""`-k EXPR`: select cases by name, as pytest does (`linear and not mse`, `two_layer or affine`)."""
from __future__ import annotations

import re

from backprop_check.errors import UsageError

_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def matches(expression: str, name: str) -> bool:
    """Whether `name` is selected: each word matches as a substring; and/or/not combine."""
    tokens = _TOKEN.findall(expression)
    if not tokens:
        return True
    python = []
    for token in tokens:
        if token in ("and", "or", "not", "(", ")"):
            python.append(token)
        else:
            python.append(repr(token.lower() in name.lower()))
    try:
        return bool(eval(" ".join(python), {"__builtins__": {}}, {}))  # noqa: S307 - only True/False/and/or/not
    except SyntaxError:
        raise UsageError(f"-k: cannot parse {expression!r}") from None
