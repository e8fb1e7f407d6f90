"""Error types: each names what the user did wrong, in one line."""
from __future__ import annotations

import sys
import sysconfig
import traceback
from pathlib import Path


class CaseError(ValueError):
    """A case is broken: it cannot be loaded, it raised, or it returned something unusable.
    `located` is true when the message already names the point it happened at."""

    located: bool = False

    def at(self, point: str) -> CaseError:
        """This error, said to have happened at `point` (unless it says so already)."""
        if self.located:
            return self
        error = CaseError(f"{self} (at the {point})")
        error.located = True
        return error


class CaseLoadError(CaseError):
    """A case file could not be imported (syntax error, failing import, missing file)."""


class UsageError(ValueError):
    """The command line or the Python API was called with options that make no sense."""


class CaseTimeout(CaseError):
    """A case ran past its time limit; `partial` is the result found before it, if any (a
    mismatch already seen stays a mismatch)."""

    partial: object | None = None
    checks: list | None = None  # forward mode: a point's checks when the limit struck while locating


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` — an exception as a user reads it."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def line_in(file: str | None, exc: BaseException) -> int | None:
    """The last line of `file` in the exception's traceback: where the user's code failed."""
    if file is None:
        return None
    target = Path(file).resolve()
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == target:
            line = frame.lineno
    return line



def raised_at(exc: BaseException) -> str:
    """" (at file.py:line)": the innermost frame of the traceback in the user's code (not in
    torch, this package or Python's standard library), where a custom Function's backward
    raised; "" where there is none."""
    skipped = [Path(__file__).resolve().parent, Path(sysconfig.get_paths()["stdlib"]).resolve()]
    torch = sys.modules.get("torch")
    if torch is not None and torch.__file__:
        skipped.append(Path(torch.__file__).resolve().parent)
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename).resolve()
        if not any(path.is_relative_to(root) for root in skipped):
            found = f" (at {path.name}:{frame.lineno})"
    return found
