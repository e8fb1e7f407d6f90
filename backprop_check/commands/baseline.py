"""Gradient baselines: the gate for torch upgrades and refactors.

`backprop-check run --baseline FILE` compares each result's loss and autograd gradients at the
case's given point (`Result.reference`) with the values stored under its id
(`linear[cpu-float64]`). A drift beyond the dtype's tolerance makes the result a mismatch even
when manual, numerical and autograd still agree with each other: the culprit is `autograd`, the
source whose values moved (a drifting loss alone has no culprit: the forward pass moved, not a
gradient). The run's values then go to `FILE.obtained.json` beside the baseline, and the
message names the command that accepts them (`--update-baseline`).

The file is JSON with sorted keys and one number per line, so a baseline update reads as a
diff. Each entry also names its case file (relative to the baseline's folder).

`--update-baseline` touches only the results the run has: entries of cases, devices or dtypes
that `-k`, `--device`, `--dtype` or the paths left out stay as they are. A result the baseline
does not know is a note (a failure with `--baseline-strict`). An entry is stale only when its
case is gone: its file no longer exists, or no file the run read defines the case any more;
stale entries are listed (also in the JSON, JUnit and Markdown reports) and an update drops
them. An entry written before entries named their file is judged by its case name alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backprop_check import dtypes

from backprop_check.records import MISMATCH, Check, CheckKind, Culprit, Verdict, unravel
from backprop_check.errors import UsageError
from backprop_check.formats import STDOUT, check_writable, write
from backprop_check.records import Report, Result

FORMAT = 1


def add_to_argparse(parser: argparse.ArgumentParser) -> None:
    """The `run` command's baseline options."""
    group = parser.add_argument_group("gradient baseline")
    group.add_argument("--baseline", metavar="FILE", help="compare the loss and autograd gradients at each given point with FILE")
    group.add_argument("--update-baseline", action="store_true", help="write this run's values to the --baseline FILE")
    group.add_argument("--baseline-strict", action="store_true", help="a result missing from the baseline fails the run")
    group.add_argument("--baseline-rtol", type=float, metavar="RTOL", help="relative drift allowed, for every dtype (default: 1e-10 in float64, 1e-5 in float32)")


@dataclass(frozen=True)
class Drift:
    """How one stored tensor (or the loss) moved: its worst element and by how much."""

    name: str
    label: str
    shape: tuple[int, ...]
    index: tuple[int, ...] | None
    stored: float
    now: float
    diff: float
    allowed: float
    bad: int
    size: int
    limits: str

    def __str__(self) -> str:
        what = "the loss" if self.name == "loss" else f"dloss/d{self.label}"
        text = f"{what} was {self.stored!r} in the baseline, now {self.now!r}; differs by {self.diff:.3g}, allowed {self.allowed:.3g} ({self.limits})"
        return text + (f"; {self.bad} of {self.size} elements drifted" if self.size > 1 else "")


@dataclass(frozen=True)
class Threshold:
    """How far a value may move from its baseline; `rtol` (from `--baseline-rtol`) replaces the
    relative part of every dtype's default."""

    rtol: float | None = None

    def limits(self, dtype: str) -> tuple[float, float]:
        table = dtypes.row(dtype)  # the atol part scales with the tensor's largest baseline value
        rtol, atol = table.baseline_rtol, table.baseline_atol
        return (rtol if self.rtol is None else self.rtol), atol

    def fails(self, name: str, dtype: str, stored: Any, now: Any) -> Drift | str | None:
        """Why `now` is not `stored` within tolerance (a Drift, or a sentence when the shape
        changed), or None when it is."""
        old, new = _tensor(stored), _tensor(now)
        if old.shape != new.shape:
            return f"{name} changed shape from {list(old.shape)} to {list(new.shape)}"
        rtol, atol = self.limits(dtype)
        finite = old[torch.isfinite(old)].abs()
        scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
        allowed = rtol * old.abs() + atol * scale
        diff = (new - old).abs()
        same = (new == old) | (torch.isnan(new) & torch.isnan(old))
        bad = ~same & ~(diff <= allowed)
        if not bool(bad.any()):
            return None
        flat = int(torch.argmax(torch.where(bad, torch.nan_to_num(diff / allowed, nan=math.inf), -1.0).reshape(-1)))
        index = unravel(int(flat), tuple(old.shape)) if old.dim() else None
        label = f"{name}[{', '.join(map(str, index))}]" if index else name
        return Drift(
            name=name,
            label=label,
            shape=tuple(old.shape),
            index=index,
            stored=float(old.reshape(-1)[flat]),
            now=float(new.reshape(-1)[flat]),
            diff=float(diff.reshape(-1)[flat]),
            allowed=float(allowed.reshape(-1)[flat]),
            bad=int(bad.sum()),
            size=old.numel(),
            limits=f"{dtype}: rtol {rtol:g}, atol {atol:g}·max(1, max|baseline|)",
        )


@dataclass
class Baseline:
    """A baseline file and what to do with it in this run."""

    path: Path
    threshold: Threshold
    strict: bool = False
    update: bool = False
    command: str = ""  # the command that rewrites the file from this run

    @property
    def obtained(self) -> Path:
        """`gradients.obtained.json` beside `gradients.json`: this run's values after a drift."""
        return self.path.with_name(f"{self.path.stem}.obtained{self.path.suffix or '.json'}")

    def read(self) -> dict[str, Any]:
        """The stored entries by result id ({} when the file does not exist yet)."""
        if not self.path.exists():
            return {}
        try:
            content = json.loads(self.path.read_text(encoding="utf-8"))
            entries = content["cases"]
            if not isinstance(entries, dict):
                raise TypeError("'cases' is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--baseline {self.path}: not a backprop-check baseline ({exc})") from None
        return entries

    def apply(self, report: Report) -> list[str]:
        """Compare (or, with --update-baseline, rewrite) and return lines for the user; what was
        found also goes to `report.baseline`, for the JSON, JUnit and Markdown reports."""
        stored = self.read()
        return self._write(report, stored) if self.update else self._compare(report, stored)

    def _compare(self, report: Report, stored: dict[str, Any]) -> list[str]:
        lines: list[str] = []
        missing: list[str] = []
        drifted: list[str] = []
        for result in report.results:
            if result.reference is None:
                continue
            if result.id not in stored:
                missing.append(result.id)
                self._missing(result)
                continue
            if self._drift(result, stored[result.id]):
                drifted.append(result.id)
        if not self.path.exists():
            lines.append(f"baseline {self.path} does not exist yet; create it with: {self.command}")
        elif missing:
            lines.append(f"baseline {self.path}: {len(missing)} results not in it ({_some(missing)}); add them with: {self.command}")
        stale = self.stale(report, stored)
        if stale:
            lines.append(f"baseline {self.path}: {len(stale)} stale entries, whose case is gone ({_some(stale)}); --update-baseline drops them")
        if drifted or (self.strict and missing):
            write(self.obtained, self.render(self.entries(report, stored)))
            lines.append(f"baseline {self.path}: {len(drifted)} results drifted; this run's values are in {self.obtained}; accept them with: {self.command}")
        elif not report.partial:
            self.obtained.unlink(missing_ok=True)  # an old one would describe a drift that is gone
        report.baseline = self._found(missing=missing, stale=stale, drifted=drifted, updated=False)
        return lines

    def _drift(self, result: Result, entry: Mapping[str, Any]) -> int:
        """Mark `result` when it moved from `entry`; 1 if it did, else 0."""
        assert result.reference is not None
        reasons: list[Drift | str] = []
        old_grads, new_grads = entry.get("gradients", {}), result.reference["gradients"]
        for name in sorted(set(old_grads) | set(new_grads)):
            if name not in new_grads:
                reasons.append(f"parameter {name!r} is in the baseline but no longer in the case")
            elif name not in old_grads:
                reasons.append(f"parameter {name!r} is new: not in the baseline")
            else:
                reasons.append(self.threshold.fails(name, result.dtype, old_grads[name], new_grads[name]))  # type: ignore[arg-type]
        reasons.append(self.threshold.fails("loss", result.dtype, entry.get("loss", math.nan), result.reference["loss"]))  # type: ignore[arg-type]
        found = [reason for reason in reasons if reason is not None]
        if not found:
            return 0
        first = found[0]
        source = result.reference.get("source", "autograd")  # "manual" for a numpy case (no autograd)
        culprit = Culprit(source) if not (isinstance(first, Drift) and first.name == "loss") else None
        result.checks.extend(_check(reason, culprit) for reason in found if isinstance(reason, Drift))
        agreed = result.verdict in (Verdict.OK, Verdict.NONDIFFERENTIABLE)
        text = (
            f"{result.case} drifted from the baseline {self.path}: {first}"
            + (f"; {len(found) - 1} more value{'s' * (len(found) > 2)} drifted" if len(found) > 1 else "")
            + (f"; the {'three sources' if source == 'autograd' else 'manual and numerical gradients'} still agree with each other" if agreed else "")
            + f"; update the baseline with: {self.command}"
        )
        if agreed:
            if result.message:
                result.notes.append(result.message)
            result.verdict, result.culprit, result.message = MISMATCH, culprit, text
        else:
            result.notes.append(text)
        return 1

    def _missing(self, result: Result) -> None:
        text = f"{result.case} is not in the baseline {self.path}; add it with: {self.command}"
        if self.strict and result.verdict in (Verdict.OK, Verdict.NONDIFFERENTIABLE):
            if result.message:
                result.notes.append(result.message)
            result.verdict, result.culprit, result.message = MISMATCH, None, f"{text} (--baseline-strict)"
        else:
            result.notes.append(text)

    def _write(self, report: Report, stored: dict[str, Any]) -> list[str]:
        if report.partial:
            report.baseline = self._found(missing=[], stale=[], drifted=[], updated=False)
            return [f"baseline {self.path}: not updated, the run was interrupted"]
        entries = self.entries(report, stored)
        write(self.path, self.render(entries))
        self.obtained.unlink(missing_ok=True)
        added = sorted(set(entries) - set(stored))
        changed = [key for key in entries if key in stored and _values(entries[key]) != _values(stored[key])]
        dropped = self.stale(report, stored)
        ran = {result.id for result in report.results if result.reference is not None}
        kept = sum(1 for key in entries if key not in ran)  # left as they were: not in this run
        report.baseline = self._found(missing=[], stale=dropped, drifted=changed, updated=True)
        line = f"baseline {self.path}: wrote {len(entries)} entries ({len(changed)} changed, {len(added)} added, {len(dropped)} dropped, {kept} kept)"
        return [line + (f"; dropped: {_some(dropped)}" if dropped else "")]

    def _found(self, *, missing: list[str], stale: list[str], drifted: list[str], updated: bool) -> dict[str, Any]:
        """What the reports show of this baseline (`Report.baseline`)."""
        return {"file": str(self.path), "missing": missing, "stale": stale, "drifted": drifted, "updated": updated, "command": self.command}

    def entries(self, report: Report, stored: Mapping[str, Any]) -> dict[str, Any]:
        """The baseline after this run: every stored entry but the stale ones, with this run's
        values where it has them (a result without values, skipped or broken, keeps its entry)."""
        stale = set(self.stale(report, stored))
        entries = {key: entry for key, entry in stored.items() if key not in stale}
        for result in report.results:
            if result.reference is not None:
                entry = {"loss": result.reference["loss"], "gradients": result.reference["gradients"]}
                if result.file:
                    entry["file"] = self._relative(result.file)
                entries[result.id] = _jsonable(entry)
        return entries

    def stale(self, report: Report, stored: Mapping[str, Any]) -> list[str]:
        """Entries whose case is gone: their file no longer exists, or no file this run read
        defines the case. An entry of a file this run did not read (or could not import), or
        of a case it did not select, is not stale."""
        read = {Path(file).resolve(): set(names) for file, names in report.files.items()}
        defined = set().union(*read.values()) | {result.case for result in report.results if result.device != "-"}
        # An old entry names no file: judged by its case name, and only when every file loaded.
        judge_old = bool(read) and not any(result.device == "-" for result in report.results)
        gone = []
        for key, entry in stored.items():
            name = key.rsplit("[", 1)[0]
            if name in defined:
                continue
            file = entry.get("file") if isinstance(entry, Mapping) else None
            if file is None:
                if judge_old:
                    gone.append(key)
                continue
            where = (self.path.parent / file).resolve()
            if where in read or not where.exists():
                gone.append(key)
        return sorted(gone)

    def _relative(self, file: str) -> str:
        return Path(os.path.relpath(Path(file).resolve(), self.path.parent.resolve())).as_posix()

    @staticmethod
    def render(entries: Mapping[str, Any]) -> str:
        content = {"backprop_check_baseline": FORMAT, "torch": torch.__version__, "cases": _jsonable(entries)}
        return json.dumps(content, indent=2, sort_keys=True, allow_nan=False) + "\n"


def from_args(args: argparse.Namespace) -> Baseline | None:
    """The baseline the `run` command's options ask for, or None; checks them before the run."""
    if args.update_baseline and not args.baseline:
        raise UsageError("--update-baseline needs --baseline FILE")
    if not args.baseline:
        if args.baseline_strict or args.baseline_rtol is not None:
            raise UsageError("--baseline-strict and --baseline-rtol need --baseline FILE")
        return None
    if args.baseline_rtol is not None and not args.baseline_rtol >= 0:
        raise UsageError(f"--baseline-rtol must be 0 or more, got {args.baseline_rtol}")
    if args.baseline == STDOUT:
        raise UsageError("--baseline needs a file: it is read and written")
    baseline = Baseline(
        Path(args.baseline),
        Threshold(args.baseline_rtol),
        strict=args.baseline_strict,
        update=args.update_baseline,
        command=update_command(args),
    )
    baseline.read()  # a corrupt file is a usage error now, not after a long run
    if baseline.update:
        check_writable(baseline.path, "--baseline")
    else:
        check_writable(baseline.obtained, "--baseline writes a drift's values to")
    return baseline


def update_command(args: argparse.Namespace) -> str:
    """The exact command that rewrites the baseline from the same selection as this run.
    `--seed` matters: a param given as a callable of the generator draws its given point."""
    parts = ["backprop-check", "run", *args.paths]
    if args.select:
        parts += ["-k", args.select]
    for option in ("device", "dtype"):
        for value in getattr(args, option) or []:
            parts += [f"--{option}", value]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    return shlex.join([*parts, "--baseline", args.baseline, "--update-baseline"])


def _check(drift: Drift, culprit: Culprit | None) -> Check:
    return Check(
        name=f"baseline {drift.name}",
        kind=CheckKind.BASELINE,
        shape=drift.shape,
        verdict=MISMATCH,
        culprit=culprit,
        index=drift.index,
        **{"manual" if culprit == Culprit.MANUAL else "autograd": drift.now if drift.name != "loss" else None},
        reference=drift.stored,
        abs_err=drift.diff,
        rel_err=drift.diff / abs(drift.stored) if drift.stored else math.inf,
        allowed=drift.allowed,
        ratio=drift.diff / drift.allowed if drift.allowed else math.inf,
        bad=drift.bad,
        size=drift.size,
        note=f"baseline {drift.stored!r}, now {drift.now!r}",
    )


def _tensor(value: Any) -> torch.Tensor:
    return torch.tensor(_numbers(value), dtype=torch.float64)


def _numbers(value: Any) -> Any:
    """Nested lists of floats, with the strings "nan", "inf", "-inf" turned back into floats."""
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return float(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _values(entry: Any) -> Any:
    """An entry without its file: what `changed` compares."""
    return {key: value for key, value in entry.items() if key != "file"} if isinstance(entry, Mapping) else entry


def _some(ids: list[str], shown: int = 5) -> str:
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more
