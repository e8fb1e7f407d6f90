"""Time limits: a hanging case (or case file) is reported, and the rest still run."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from backprop_check.errors import CaseTimeout


@contextmanager
def time_limit(seconds: float | None, what: str = "the case") -> Iterator[None]:
    """Raise CaseTimeout in the block after `seconds` (main thread, where SIGALRM exists)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"{what} ran past its time limit of {seconds:g}s (--timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
