"""The run options, defined once and shared by the CLI and the pytest plugin."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .runner import DEVICES, DTYPES, POINTS, TIMEOUT, Plan


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
    Option("full", "check every element of every tensor (default: a tensor of over 2048 elements is checked along random directions and at a sample of elements; where those disagree, element by element inside the blocks that disagree)", False, type=None, flag=True),
    Option("timeout", f"seconds one case may take before it is reported as an error (default: {TIMEOUT:g})", TIMEOUT, float, "SECONDS"),
)


def add_to_argparse(parser: argparse.ArgumentParser) -> None:
    for option in OPTIONS:
        if option.flag:
            parser.add_argument(f"--{option.name}", dest=option.dest, action="store_true", help=option.help)
            continue
        parser.add_argument(
            f"--{option.name}",
            dest=option.dest,
            default=option.default,
            type=option.type,
            metavar=option.metavar,
            help=option.help,
            action="append" if option.repeat else "store",
        )


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
    )


def _flatten(given: Sequence[str] | str | None) -> list[str]:
    if not given:
        return []
    if isinstance(given, str):
        given = [given]
    return [name for item in given for name in _names(item)]
