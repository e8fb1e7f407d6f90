"""The run options, defined once and shared by the CLI, the pytest plugin and the Python API:
their defaults, the `Plan` they make, and how each surface registers them.

This module imports no torch: the pytest plugin registers the options and checks them in every
pytest process, also in xdist's controller, which never checks a case and so never needs torch.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backprop_check import dtypes
from backprop_check.errors import UsageError
from backprop_check.selection import matches

DEVICES = ("cpu", "cuda")
DTYPES = ("float64", "float32")
POINTS = 3
TIMEOUT = 300.0  # seconds per case: generous, so that only a hanging case meets it


@dataclass
class Plan:
    """What to check: the options shared by the CLI, the pytest plugin and the Python API."""

    devices: tuple[str, ...] = DEVICES
    dtypes: tuple[str, ...] = DTYPES
    points: int = POINTS
    seed: int = 0
    select: str | None = None
    timeout: float | None = TIMEOUT
    full: bool = False  # check every element of every tensor, however large
    # The devices were asked for by name (--device): one that is unavailable fails the run
    # instead of being skipped, as the default "cuda when present" is.
    strict_devices: bool = False
    # Called as progress(case, device, dtype, point, points) before each point (see terminal.Progress).
    progress: Callable[[str, str, str, int, int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for dtype in self.dtypes:
            dtypes.require(dtype)
        for device in self.devices:
            if device.split(":")[0] not in ("cpu", "cuda", "mps"):
                raise UsageError(f"unknown device {device!r} (use cpu or cuda)")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"--timeout must be positive, got {self.timeout}")
        if self.points < 0:
            raise UsageError(f"--points must be 0 or more, got {self.points}")
        if self.select is not None:
            matches(self.select, "")  # a -k expression that cannot be parsed fails before the run


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class Option:
    """One option: `--name` on the command line, `--bc-name` under pytest."""

    name: str
    help: str
    default: Any
    type: Callable[[str], Any] = str
    metavar: str | None = None
    repeat: bool = False  # may be given several times or comma-separated
    flag: bool = False  # takes no value

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("device", f"device to check on, repeatable or comma-separated (default: {','.join(DEVICES)})", None, metavar="DEV", repeat=True),
    Option("dtype", f"dtype to check in, repeatable or comma-separated (default: {','.join(DTYPES)})", None, metavar="DTYPE", repeat=True),
    Option("points", f"random points besides the given one (default: {POINTS})", POINTS, int, "N"),
    Option("seed", "seed of the random points (default: 0)", 0, int, "S"),
    Option("full", "estimate every element of every tensor numerically (default: manual against autograd at every element, a tensor of over 30 elements estimated at a sample of elements and along random directions, and element by element where manual and autograd disagree or a bisected direction leads)", False, type=None, flag=True),
    Option("timeout", f"seconds one case may take before it is reported as an error (default: {TIMEOUT:g})", TIMEOUT, float, "SECONDS"),
    Option("allow-skip", "a device named with --device that is not available is skipped, as the default cuda is, instead of failing the run", False, type=None, flag=True),
)


def register(add: Callable[..., Any], prefix: str = "") -> None:
    """Declare every option through `add` (argparse's `add_argument`, pytest's `addoption`),
    as `--{prefix}{name}` stored under `{prefix}{dest}` with "-" read as "_"."""
    for option in OPTIONS:
        dest = (prefix + option.name).replace("-", "_")
        if option.flag:
            add(f"--{prefix}{option.name}", dest=dest, action="store_true", help=option.help)
            continue
        add(
            f"--{prefix}{option.name}",
            dest=dest,
            default=option.default,
            type=option.type,
            metavar=option.metavar,
            help=option.help,
            action="append" if option.repeat else "store",
        )


def add_to_argparse(parser: argparse.ArgumentParser) -> None:
    """The options on the command line: `--dtype float64`."""
    register(parser.add_argument)


def plan_from(values: Callable[[str], Any], select: str | None = None) -> Plan:
    """A Plan from option values looked up by `dest` (argparse namespace or pytest config)."""
    devices = _flatten(values("device"))
    dtypes = _flatten(values("dtype"))
    return Plan(
        devices=tuple(devices) if devices else DEVICES,
        dtypes=tuple(dtypes) if dtypes else DTYPES,
        points=values("points"),
        seed=values("seed"),
        select=select,
        timeout=values("timeout"),
        full=bool(values("full")),
        strict_devices=bool(devices) and not values("allow_skip"),
    )


def _flatten(given: Sequence[Any] | str | None) -> list[str]:
    if not given:
        return []
    if isinstance(given, str):
        given = [given]
    # A torch.dtype or torch.device from the Python API is said by its name: "float32", "cuda:1".
    return [name for item in given for name in _names(dtypes.name_of(item))]


def devices_for(case: Any, devices: tuple[str, ...]) -> tuple[str, ...]:
    """The devices `case` is checked on: a numpy case is a CPU case, with no other device's
    results (asked for none but other devices, it has one, skipped with the reason)."""
    if not case.numpy:
        return devices
    return ("cpu",) if "cpu" in devices else devices[:1]
