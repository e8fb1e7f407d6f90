"""The JSON report: `{"results": [...], "summary": {...}}`; non-finite numbers as strings."""
from __future__ import annotations

import json
import math
from typing import Any

from backprop_check.records import Report


def render(report: Report) -> str:
    return json.dumps(finite(report.to_dict()), indent=2, ensure_ascii=False) + "\n"


def finite(value: Any) -> Any:
    """`value` with NaN and ±Inf as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value
