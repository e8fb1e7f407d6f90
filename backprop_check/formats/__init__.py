"""Report formats: each a module with `render(report) -> str`, registered here by name."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..report import Report
from . import html, json, junit, markdown, text

FORMATS: dict[str, Callable[[Report], str]] = {
    "text": text.render,
    "html": html.render,
    "json": json.render,
    "junit": junit.render,
    "markdown": markdown.render,
}


def write_atomic(path: str | Path, content: str) -> None:
    """Write `content` to `path` through a temporary file and a rename: an interrupted run
    never leaves a truncated report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
