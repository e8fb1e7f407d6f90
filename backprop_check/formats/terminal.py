"""What a terminal allows: its width, colour for the verdicts, and a progress line while a run goes.

Nothing here writes escape codes or progress into a file, a pipe or a captured stream: those get
plain text at `COLUMNS` columns when that variable is set (the convention of
`shutil.get_terminal_size`), else at `WIDTH`. Colour also stays off when `NO_COLOR` is set
(https://no-color.org) or `TERM=dumb`.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from backprop_check.records import Verdict

WIDTH = 100  # columns when the stream is not a terminal (a file, a pipe, CI's log)
MIN_WIDTH = 40
REDRAW = 0.1  # seconds between two progress lines of one case

# ANSI SGR codes per verdict (and culprit marks): red for what fails, yellow for a kink.
COLOURS = {
    Verdict.OK: "32",
    Verdict.MISMATCH: "1;31",
    Verdict.NONDIFFERENTIABLE: "33",
    "nondiff": "33",  # the verdict's short form in a narrow table
    Verdict.ERROR: "1;35",
    Verdict.SKIPPED: "2",
}


@dataclass(frozen=True)
class Style:
    """How to lay out text for one stream: its width in columns and whether to colour it."""

    width: int = WIDTH
    colour: bool = False

    def paint(self, text: str, verdict: str) -> str:
        """`text` in the colour of `verdict` (unchanged without colour, or for an unknown verdict)."""
        code = COLOURS.get(verdict)
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour and code and text else text


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether `stream` is an interactive terminal (a file, a pipe or pytest's capture is not)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without a descriptor
        return False


def style_for(stream: IO[str] | None) -> Style:
    """The terminal's width and colour for `stream`; plain text otherwise, at `COLUMNS` columns
    when that is set, else at `WIDTH`."""
    if not is_terminal(stream):
        return Style(width=max(MIN_WIDTH, _columns_variable() or WIDTH))
    columns = shutil.get_terminal_size((WIDTH, 24)).columns
    return Style(width=max(MIN_WIDTH, columns), colour=colour_allowed())


def _columns_variable() -> int | None:
    """`COLUMNS` as `shutil.get_terminal_size` reads it: a positive integer, else None. It is
    read for a file or a pipe too (`COLUMNS=80 backprop-check run … | less`), where asking the
    terminal would measure a terminal the text is not going to."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return None
    return columns if columns > 0 else None


def colour_allowed() -> bool:
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class Progress:
    """A progress line on a terminal: the case, device and dtype, point k of n, the elapsed time.

    Called by the runner (see `Plan.progress`) before each point; it rewrites one line of
    `stream` in place and does nothing at all when `stream` is not a terminal. `close()` clears
    the line so that the report starts on a clean one."""

    def __init__(
        self, stream: IO[str] | None = None, *, enabled: bool | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.clock = clock
        self.started = clock()
        self.shown = ""
        self.case: str | None = None
        self.drawn = float("-inf")

    def __call__(self, case: str, device: str, dtype: str, point: int, points: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if case == self.case and now - self.drawn < REDRAW:  # a terminal need not flicker through quick points
            return
        self.case, self.drawn = case, now
        elapsed = now - self.started
        line = f"checking {case} on {device} {dtype}: point {point} of {points} ({elapsed:.1f}s)"
        width = shutil.get_terminal_size((WIDTH, 24)).columns - 1
        if len(line) > width:
            line = line[: max(0, width - 1)] + "…"
        if line != self.shown:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self.shown = line

    def close(self) -> None:
        """Clear the progress line (if one was shown)."""
        if self.enabled and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = ""
