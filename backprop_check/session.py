"""The pytest plugin's state: one `CheckSession` per pytest process owns the plan, tells case
files from other files, and runs each case once, serving its results to the case's items.

Which files are case files: a `.py` file under one of the `backprop_check_paths` folders (ini
option, default `cases`, relative to the rootdir), or one named on the command line; never
`conftest.py`, a file or folder whose name starts with `_` or `.`, or a file that matches
`python_files` (`test_*.py`: those are pytest's own). So `pytest cases/` checks the cases while
`pytest tests/` never imports a helper or a deliberately broken case file kept under tests/.

Under pytest-xdist a worker that is sent any of a case's items runs the case once, for all its
selected runs; with `--dist loadfile` all of a case's items go to one worker, so each case runs
exactly once in the whole session.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from .case import Case
from .errors import UsageError
from .formats import text
from .loader import load
from .options import plan_from
from .report import Report, Result
from .runner import Plan, check_case, device_unavailable, devices_for

DEFAULT_PATHS = ("cases",)
FAILING = ("mismatch", "error")


class CheckSession:
    """Everything the plugin knows in one pytest process (the controller or an xdist worker)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        try:
            self.plan: Plan = plan_from(lambda name: config.getoption(f"bc_{name}"))
        except UsageError as exc:
            raise pytest.UsageError(f"backprop-check: {exc}") from None
        roots = config.getini("backprop_check_paths") or [config.rootpath / p for p in DEFAULT_PATHS]
        self.roots = [Path(root).resolve() for root in roots]
        self.wanted: dict[Case, set[tuple[str, str]]] = defaultdict(set)
        self.results: dict[Case, dict[str, Result]] = {}

    def header(self) -> str:
        """The report header's line: what each case is checked on, and where case files live."""
        plan = self.plan
        roots = ", ".join(str(r.relative_to(self.config.rootpath)) if r.is_relative_to(self.config.rootpath) else str(r) for r in self.roots)
        return (
            f"backprop-check: {','.join(plan.devices)} × {','.join(plan.dtypes)}, {plan.points} random points, "
            f"seed {plan.seed}; case files under {roots}"
        )

    def is_case_file(self, path: Path, explicit: bool) -> bool:
        """Whether pytest should collect `path` as a case file (see the module docstring)."""
        if path.suffix != ".py" or path.name == "conftest.py" or self._is_test_module(path):
            return False
        if explicit:
            return True
        path = path.resolve()
        for root in self.roots:
            if path.is_relative_to(root):
                return not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)
        return False

    def _is_test_module(self, path: Path) -> bool:
        patterns = self.config.getini("python_files")
        return any(fnmatch.fnmatch(path.name, p) if "/" not in p else path.match(p) for p in patterns)

    def cases(self, path: Path) -> list[Case]:
        """The cases a file defines; a file that cannot be loaded is one line of collection error."""
        cases, failures = load([path])
        if failures:
            raise CaseFile.CollectError("; ".join(f"{f.where}: {f.reason}" for f in failures))
        return cases

    def items(self, parent: CaseFile, cases: list[Case]) -> Iterator[CaseItem]:
        for case in cases:
            for device in devices_for(case, self.plan.devices):  # a numpy case: the CPU only
                for dtype in self.plan.dtypes:
                    name = f"{case.name}[{device}-{dtype}]"
                    yield CaseItem.from_parent(parent, name=name, case=case, device=device, dtype=dtype)

    def selected(self, items: list[pytest.Item]) -> None:
        """Remember which runs of each case survived -k and the like: only those are checked."""
        for item in items:
            if isinstance(item, CaseItem):
                self.wanted[item.case].add((item.device, item.dtype))

    def check(self, item: CaseItem) -> None:
        """Skip, pass or fail one item from its case's results."""
        unavailable = device_unavailable(item.device)
        if unavailable:
            skip(unavailable)
        result = self.result(item)
        if result.verdict == "skipped":
            skip(result.message)
        if result.verdict in FAILING:
            raise GradientFailure(result)

    def result(self, item: CaseItem) -> Result:
        """The item's result, from a run of its case over every selected device and dtype."""
        if item.case not in self.results:
            runs = self.wanted.get(item.case) or {(item.device, item.dtype)}
            plan = replace(
                self.plan,
                devices=tuple(d for d in self.plan.devices if any(d == run[0] for run in runs)),
                dtypes=tuple(t for t in self.plan.dtypes if any(t == run[1] for run in runs)),
            )
            self.results[item.case] = {r.id: r for r in check_case(item.case, plan)}
        return self.results[item.case][item.name]

    def explain(self, result: Result) -> str:
        """A failure as the text report shows it, under a headline that pytest's short summary
        quotes: the table, then the message, hints and notes."""
        if result.verdict == "error":
            headline = f"error: {result.message}"
        else:
            headline = f"{result.verdict}: {result.culprit or 'no single source'} is the odd one out"
        shown = headline + "\n\n" + text.render(Report(results=[result], seconds=result.seconds)).rstrip()
        if result.traceback and self.config.getoption("tbstyle") == "long":
            shown += "\n\n" + result.traceback.rstrip()
        return shown


class GradientFailure(Exception):
    """An item's result is a mismatch or an error; pytest shows the harness's text for it."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.message)
        self.result = result


class CaseFile(pytest.File):
    """A case file: one item per case × device × dtype."""

    def collect(self) -> Iterator[CaseItem]:
        state = session_of(self.config)
        yield from state.items(self, state.cases(self.path))


class CaseItem(pytest.Item):
    """One case on one device in one dtype: `linear[cpu-float64]`."""

    def __init__(self, *, case: Case, device: str, dtype: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case, self.device, self.dtype = case, device, dtype

    def runtest(self) -> None:
        session_of(self.config).check(self)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, GradientFailure):
            return session_of(self.config).explain(excinfo.value.result)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, (self.case.line - 1 if self.case.line else None), self.name


KEY = pytest.StashKey[CheckSession]()


def skip(reason: str) -> None:
    """Skip the running item, reported at the item's line rather than this one."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


def session_of(config: pytest.Config) -> CheckSession:
    return config.stash[KEY]
