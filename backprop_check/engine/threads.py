"""How many intra-op threads torch uses while a check runs, chosen for the work at hand.

A check makes thousands of small torch calls (perturbed forward passes, comparisons). A thread
pool gains nothing on tensors below torch's grain size (32,768 elements: smaller ops run on one
thread anyway) and costs a hand-off per parallel region; on a busy machine (a shared CI runner,
`pytest -n 2`) a pool whose threads spin while they wait for a descheduled sibling makes every
such call 10–60× slower. So, for each case:

- the check runs on **one thread** when its point holds fewer than SMALL elements in all, or
  when the machine is already busy (its 1-minute load average above its usable cores);
- otherwise on the cores this process may use, **split between pytest-xdist's workers**
  (`PYTEST_XDIST_WORKER_COUNT`), never more than torch's own setting;
- the user's setting is **put back** after the case, whatever happens in it.

Opt-outs: `BACKPROP_CHECK_THREADS=keep` leaves torch's setting alone, `BACKPROP_CHECK_THREADS=N`
runs every check on N threads, and an `OMP_NUM_THREADS` or `MKL_NUM_THREADS` in the environment
is taken as the user's own choice (torch already follows it) and left alone too.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from backprop_check.errors import CaseError

VARIABLE = "BACKPROP_CHECK_THREADS"
KEEP = ("keep", "off")
AUTO = ("", "auto")
# The user's own thread settings, which torch reads at start-up: a check leaves them be.
USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# torch's at::internal::GRAIN_SIZE: below it an elementwise op runs on one thread whatever the pool.
SMALL = 32768


def threads_for(elements: int, environ: Mapping[str, str] | None = None) -> int | None:
    """The intra-op threads for a check whose point holds `elements` numbers in all; None: leave
    torch's setting as it is (an opt-out, or the user's own OMP/MKL setting)."""
    environ = os.environ if environ is None else environ
    asked = environ.get(VARIABLE, "").strip().lower()
    if asked in KEEP:
        return None
    if asked not in AUTO:
        if not asked.isdigit() or int(asked) < 1:
            raise CaseError(f"{VARIABLE}={environ[VARIABLE]!r} is not a number of threads, 'auto' or 'keep'")
        return int(asked)
    if any(environ.get(name, "").strip() for name in USER_SETTINGS):
        return None
    cores = usable_cores()
    if elements < SMALL or busy(cores):
        return 1
    workers = _positive(environ.get("PYTEST_XDIST_WORKER_COUNT"), 1)
    return max(1, min(torch.get_num_threads(), cores // workers))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def busy(cores: int) -> bool:
    """Whether other work already keeps every usable core busy (1-minute load average)."""
    try:
        return os.getloadavg()[0] > cores
    except OSError:  # no load average on this platform
        return False


@contextmanager
def chosen(elements: int, environ: Mapping[str, str] | None = None) -> Iterator[int]:
    """Run the block on `threads_for(elements)` threads; the previous setting comes back after.
    Yields the number of threads the block runs on."""
    previous = torch.get_num_threads()
    wanted = threads_for(elements, environ)
    if wanted is None or wanted == previous:
        yield previous
        return
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


def _positive(text: str | None, default: int) -> int:
    return int(text) if text and text.strip().isdigit() and int(text) > 0 else default
