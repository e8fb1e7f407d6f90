"""Report formats: each a module with `render(report) -> str`, registered here by name; and how
a report (or a baseline, or a trace) reaches the file the user named."""
from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from backprop_check.errors import UsageError
from backprop_check.records import VIEWS, Report
from backprop_check.formats import html
from backprop_check.formats import json
from backprop_check.formats import junit
from backprop_check.formats import markdown
from backprop_check.formats import text

FORMATS: dict[str, Callable[[Report], str]] = {
    "text": text.render,
    "html": html.render,
    "json": json.render,
    "junit": junit.render,
    "markdown": markdown.render,
}
STDOUT = "-"
VIEWS["text/html"] = html.fragment  # what a Report shows in a notebook


def write(path: str | Path, content: str) -> None:
    """Write `content` where the user asked: `-` is standard output; a regular file (or a new
    one) is replaced atomically, through a temporary file beside it and a rename, so that an
    interrupted run never leaves a truncated report; anything else (a FIFO, a device,
    `>(cmd)`'s /dev/fd/N) is written straight, since a rename would replace it with a file.

    A symlink is followed and its target replaced. A new file gets the usual mode (0666 less the
    umask, as any tool's output); an existing file keeps its mode."""
    if str(path) == STDOUT:
        sys.stdout.write(content)
        sys.stdout.flush()
        return
    path = Path(path)
    try:
        existing: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(content)
        return
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    except PermissionError:
        if existing is None:
            raise
        # The folder is closed to new files but the file itself is writable: write it in place.
        with open(target, "w", encoding="utf-8") as stream:
            stream.write(content)
        return
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(content)
        if existing is not None:
            os.chmod(temporary, stat.S_IMODE(existing.st_mode))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_writable(path: str | Path, option: str) -> None:
    """Raise a one-line UsageError, before the run, when `write(path, ...)` would fail."""
    reason = _unwritable(path)
    if reason:
        raise UsageError(f"{option} {path}: cannot write there: {reason}")


def _unwritable(path: str | Path) -> str | None:
    if str(path) == STDOUT:
        return None
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:  # a path through a file, a loop of symlinks, a name too long
        return exc.strerror or str(exc)
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            return "it is a folder"
        if not os.access(path, os.W_OK):
            return "permission denied"
        return None
    # A new file (or a symlink to one): the nearest existing folder above it must take files.
    folder = Path(os.path.realpath(path)).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"permission denied to create files in {folder}"
    return None
