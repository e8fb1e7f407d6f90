"""Benchmark 3: the planted-bug corpus (`tests/corpus/*.py`), harness against gradcheck.

Each corpus file holds planted derivation bugs beside their correct twins and a module-level
`EXPECTED = {case: (verdict, culprit)}`. The harness runs the files with its default options
(every available device, float64 and float32, the given point and 3 random points); a case's
outcome is its worst result over those runs (error > mismatch > nondifferentiable > ok), with
the culprit the mismatching runs agree on.

`torch.autograd.gradcheck` checks autograd against finite differences and nothing else: a
hand-derived gradient never reaches it. On a bug in a custom `autograd.Function` backward (or a
two-way case, which has no manual gradient) it is run on the case's forward pass as a function
of its parameters (data bound) at the same points the harness uses; a manual-gradient bug is
"n/a" for it. Both tools are then run on the correct twins in float64 and in float32, where
gradcheck's fixed eps = 1e-6 and atol = 1e-5 meet float32 rounding.
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import backprop_check
from backprop_check.model.loader import load
from backprop_check.model.points import Point, given_point, random_point
from measure import seconds, table

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
POINTS = 3  # the harness's default number of random points
PRIORITY = ("error", "mismatch", "nondifferentiable", "ok")


@dataclass
class Entry:
    """One corpus case: what it should get, and what each tool gave."""

    name: str
    file: str
    expected: tuple[str, str | None]
    case: backprop_check.Case | None = None
    harness: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # dtype → (verdict, culprit)
    gradcheck: dict[str, str] = field(default_factory=dict)  # dtype → "pass" | "fail" | "error: …"

    @property
    def planted(self) -> bool:
        return self.expected[0] == "mismatch"

    @property
    def gradcheck_can_see(self) -> bool:
        """The bug lives where gradcheck looks: autograd (a custom backward), or a two-way case."""
        return self.expected[1] in ("autograd", None) or (self.case is not None and self.case.manual_fn is None)

    def outcome(self, dtype: str | None = None) -> tuple[str, str | None]:
        runs = [v for d, v in self.harness.items() if dtype is None or d == dtype]
        if not runs:
            return ("missing", None)
        worst = min(runs, key=lambda v: PRIORITY.index(v[0]) if v[0] in PRIORITY else -1)[0]
        culprits = {c for v, c in runs if v == worst}
        return worst, culprits.pop() if len(culprits) == 1 else None


def corpus_files() -> list[Path]:
    return [p for p in sorted(CORPUS.glob("*.py")) if not p.name.startswith("_") and p.name != "conftest.py"]


def expected_of(path: Path) -> dict[str, tuple[str, str | None]]:
    """The file's EXPECTED dict (importing it under a private name; its cases are discarded)."""
    spec = importlib.util.spec_from_file_location(f"_bench_corpus_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(getattr(module, "EXPECTED", {}))


def loss_of_params(case: backprop_check.Case, point: Point, dtype: torch.dtype) -> tuple[Callable, tuple[torch.Tensor, ...]]:
    """The case's forward pass as a function of its parameters, data bound, all in `dtype`."""
    at = point.cast(dtype)
    names = list(at.params)

    def loss(*params: torch.Tensor) -> torch.Tensor:
        return case.forward(**dict(zip(names, params)), **at.data).reshape(())

    return loss, tuple(at.params[n].clone().requires_grad_(True) for n in names)


def gradcheck_case(case: backprop_check.Case, dtype: torch.dtype) -> str:
    """gradcheck (slow mode, its defaults) at the given point and the harness's random points."""
    try:
        given = given_point(case, 0)
        points = [given] + [random_point(case, given, i, 0) for i in range(1, POINTS + 1)]
        for point in points:
            fn, params = loss_of_params(case, point, dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not torch.autograd.gradcheck(fn, params, raise_exception=False):
                    return "fail"
    except Exception as exc:  # noqa: BLE001 - report what gradcheck could not run, do not stop
        return f"error: {type(exc).__name__}"
    return "pass"


def rate(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.0f}%)" if total else "0/0"


def run() -> tuple[str, list[tuple[str, bool]]]:
    files = corpus_files()
    entries: dict[str, Entry] = {}
    for path in files:
        for name, want in expected_of(path).items():
            entries[name] = Entry(name, path.name, (want[0], want[1]))
    if not entries:
        return f"no corpus files with EXPECTED under {CORPUS}", []
    for found in load(files)[0]:
        if found.name in entries:
            entries[found.name].case = found

    started = time.perf_counter()
    report = backprop_check.run(files)
    harness_seconds = time.perf_counter() - started
    for result in report.results:
        if result.case in entries and result.verdict != "skipped":
            entries[result.case].harness[result.dtype] = (result.verdict, result.culprit)

    started = time.perf_counter()
    for entry in entries.values():
        if entry.case is None or entry.case.module is not None:
            continue
        if not entry.planted or entry.gradcheck_can_see:
            entry.gradcheck["float64"] = gradcheck_case(entry.case, torch.float64)
        if not entry.planted:
            entry.gradcheck["float32"] = gradcheck_case(entry.case, torch.float32)
    gradcheck_seconds = time.perf_counter() - started

    planted = [e for e in entries.values() if e.planted]
    correct = [e for e in entries.values() if not e.planted]
    autograd_bugs = [e for e in planted if e.gradcheck_can_see]
    manual_bugs = [e for e in planted if not e.gradcheck_can_see]

    def found(e: Entry, dtype: str | None = None) -> bool:
        return e.outcome(dtype) == e.expected

    def alarm(e: Entry, dtype: str | None = None) -> bool:
        return e.outcome(dtype)[0] != e.expected[0]

    def gc_caught(e: Entry) -> bool:
        return e.gradcheck.get("float64", "pass") != "pass"

    def gc_alarm(e: Entry, dtype: str) -> bool:
        return e.gradcheck.get(dtype, "pass") != "pass"

    dtypes = sorted({d for e in entries.values() for d in e.harness}, reverse=True)  # float64 first
    rows = [
        ["harness, all runs (f64 + f32, given + 3 random points)",
         rate(sum(map(found, planted)), len(planted)),
         rate(sum(map(found, autograd_bugs)), len(autograd_bugs)),
         rate(sum(map(found, manual_bugs)), len(manual_bugs)),
         rate(sum(map(alarm, correct)), len(correct)), seconds(harness_seconds)],
    ]
    for dtype in dtypes:
        rows.append(
            [f"  harness, {dtype} runs alone",
             rate(sum(found(e, dtype) for e in planted), len(planted)),
             rate(sum(found(e, dtype) for e in autograd_bugs), len(autograd_bugs)),
             rate(sum(found(e, dtype) for e in manual_bugs), len(manual_bugs)),
             rate(sum(alarm(e, dtype) for e in correct), len(correct)), ""]
        )
    for dtype in ("float64", "float32"):
        rows.append(
            [f"gradcheck slow, {dtype} (given + 3 random points)",
             "n/a" if dtype == "float32" else f"{sum(map(gc_caught, autograd_bugs))}/{len(planted)} ({len(manual_bugs)} n/a)",
             rate(sum(map(gc_caught, autograd_bugs)), len(autograd_bugs)) if dtype == "float64" else "n/a",
             "n/a",
             rate(sum(gc_alarm(e, dtype) for e in correct), len(correct)),
             seconds(gradcheck_seconds) if dtype == "float64" else "(incl. above)"]
        )
    lines = [
        f"{len(files)} files in {CORPUS.relative_to(ROOT)}: {len(planted)} planted bugs "
        f"({len(manual_bugs)} in a manual gradient, {len(autograd_bugs)} in autograd: a custom backward "
        f"or a two-way case), {len(correct)} correct twins",
        "detected = mismatch with the expected culprit; false alarm = a correct twin not given its expected verdict",
        "",
        table(["tool", "bugs detected", "autograd bugs", "manual bugs", "false alarms", "time"], rows),
        "",
        "n/a: gradcheck compares autograd with finite differences of the forward pass; a hand-derived",
        "     gradient never reaches it, so the manual-gradient bugs cannot be checked by it at all.",
    ]
    misses = [e for e in planted if not found(e)] + [e for e in correct if alarm(e)]
    for e in misses:
        lines.append(f"  harness: {e.name} ({e.file}) expected {e.expected}, got {e.outcome()} "
                     f"per dtype {e.harness}")
    gc_errors = [e for e in entries.values() for d, v in e.gradcheck.items() if v.startswith("error")]
    for e in gc_errors:
        lines.append(f"  gradcheck could not run {e.name}: {e.gradcheck}")
    f32_alarms = [e.name for e in correct if gc_alarm(e, "float32")]
    if f32_alarms:
        which = "every correct twin" if len(f32_alarms) == len(correct) else ", ".join(f32_alarms)
        lines.append(f"  gradcheck float32 (eps 1e-6, atol 1e-5, rtol 1e-3) fails on {which}: a step of 1e-6")
        lines.append("  is a few float32 ulps, so its own finite differences are mostly rounding noise")
    targets = [
        (f"harness detects every planted bug with its culprit: {rate(sum(map(found, planted)), len(planted))}",
         all(map(found, planted))),
        (f"harness raises no false alarm on a correct twin: {rate(sum(map(alarm, correct)), len(correct))}",
         not any(map(alarm, correct))),
    ]
    lines.append("")
    lines.extend(f"  {'PASS' if ok else 'FAIL'}  {text}" for text, ok in targets)
    return "\n".join(lines), targets
