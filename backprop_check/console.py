"""The console script's front door: it holds Ctrl-C while torch loads, then hands over to `cli`.

`backprop-check` and `python -m backprop_check` start here. Importing `cli` imports torch, which
takes seconds; a Ctrl-C in that time used to land inside torch's import as a traceback, with no
report written. Here it is held until the import is done, and the run then stops before it
starts: the (empty) report is written where it was asked for, marked partial, and the exit
status is 130, as for a Ctrl-C at any later moment. A second Ctrl-C leaves at once (exit 130,
nothing written). This module imports nothing heavy, so that it is in place before torch is.
"""
from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

EXIT_INTERRUPTED = 130  # as records.EXIT_INTERRUPTED, which this module must not import yet


class _Held:
    """Whether Ctrl-C was pressed while it was held."""

    pressed: bool = False


@contextmanager
def held_interrupt() -> Iterator[_Held]:
    """Hold Ctrl-C (SIGINT) in the block: the first press is noted and said, the second exits."""
    held = _Held()

    def note(signum: int, frame: object) -> None:
        if held.pressed:
            raise SystemExit(EXIT_INTERRUPTED)
        held.pressed = True
        print("backprop-check: interrupted; stopping once torch has loaded (Ctrl-C again to quit at once)", file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, note)
    except ValueError:  # not the main thread: nothing to hold
        yield held
        return
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


def load_cli() -> ModuleType:
    """The command line's module (and torch with it)."""
    return importlib.import_module("backprop_check.commands.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: `cli.main`, with a Ctrl-C during its imports held (see above)."""
    with held_interrupt() as held:
        cli = load_cli()
    return cli.main(argv, interrupted=held.pressed)
