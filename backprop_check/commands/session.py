"""The pytest plugin's state: one `CheckSession` per pytest process owns the plan, tells case
files from other files, and runs each case once, serving its results to the case's items.

Which files are case files, never counting `conftest.py`, a file or folder whose name starts
with `_` or `.`, or a file that matches `python_files` (`test_*.py`: those are pytest's own):
- every `.py` file under one of the `backprop_check_paths` folders (ini option, default `cases`,
  relative to the rootdir): what a plain `pytest` or `pytest cases/` checks;
- a `.py` file named on the command line;
- a `.py` file that imports backprop_check, under a folder named on the command line
  (`pytest mycases/`). The import is read from the text, not run: a helper that does not use
  the package is never imported, and `pytest tests/` leaves the tests' helpers alone.

A file that cannot be imported, or a second case of a name that another file already defines
(the CLI's rule), is one error item; the other files still run.

Nothing here imports torch until a case file is collected: xdist's controller never needs it.
Under pytest-xdist (`-n`, plugin.py's scheduler) all of a case's items go to one worker, which
runs the case once for all its selected runs.
"""
from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from backprop_check.model.case import Case
from backprop_check.errors import UsageError
from backprop_check.model.loader import LoadFailure, load
from backprop_check.options import Plan, devices_for, plan_from
from backprop_check.records import Verdict

if TYPE_CHECKING:
    from backprop_check.records import Result

DEFAULT_PATHS = ("cases",)
FAILING = (Verdict.MISMATCH, Verdict.ERROR)
USES_PACKAGE = re.compile(r"^\s*(?:from|import)\s+backprop_check\b", re.MULTILINE)


def check_case(case: Case, plan: Plan, mode: str = "rev") -> list[Result]:
    """The runner's check_case, imported (with torch) when the first case runs."""
    from backprop_check.engine.runner import check_case as run_case

    return run_case(case, plan, mode)


def variants(case: Case, plan: Plan) -> Iterator[tuple[Case, str, str]]:
    """(case, mode, name) for every check a case asks for: the case in reverse mode, and with
    `order=` / `modes=` its derivatives (`f (order 2)`) and forward mode (`f (fwd)`), each
    its own items, as the CLI reports them. A plain case needs no torch here."""
    if case.order == 1 and case.modes == ("rev",):
        yield case, "rev", case.name
        return
    from backprop_check.engine.jvp import MODE, name_of
    from backprop_check.engine.runner import checks_of

    for checked, mode in checks_of(case, plan):
        yield checked, mode, name_of(checked) if mode == MODE else checked.name


def device_unavailable(device: str) -> str | None:
    """Why `device` cannot be used here, or None (the runner's answer)."""
    from backprop_check.engine.runner import device_unavailable as why

    return why(device)


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
        self.named = named_folders(config)
        self.wanted: dict[tuple[Case, str], set[tuple[str, str]]] = defaultdict(set)
        self.results: dict[tuple[Case, str], dict[str, Result]] = {}  # (case, mode) → id → result
        self.first: dict[str, Case] = {}  # the first case of each name, across files

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
                return not _hidden(path, root)
        for folder in self.named:
            if path.is_relative_to(folder):
                return not _hidden(path, folder) and _uses_package(path)
        return False

    def _is_test_module(self, path: Path) -> bool:
        patterns = self.config.getini("python_files")
        return any(fnmatch.fnmatch(path.name, p) if "/" not in p else path.match(p) for p in patterns)

    def cases(self, path: Path) -> tuple[list[Case], list[LoadFailure]]:
        """The cases a file defines, and what cannot run: the file itself, when it cannot be
        imported, or a case whose name another file already took (as the CLI flags it)."""
        cases, failures = load([path])
        unique = []
        for case in cases:
            first = self.first.setdefault(case.name, case)
            if first is case:
                unique.append(case)
            else:
                reason = f"two cases are named {case.name!r} (the other is at {first.where})"
                failures.append(LoadFailure(case.file or str(path), case.line, reason, case=case.name))
        return unique, failures

    def items(self, parent: CaseFile, cases: list[Case]) -> Iterator[CaseItem]:
        for case in cases:
            for checked, mode, label in variants(case, self.plan):
                for device in devices_for(checked, self.plan.devices):  # a numpy case: the CPU only
                    for dtype in self.plan.dtypes:
                        yield CaseItem.from_parent(
                            parent, name=f"{label}[{device}-{dtype}]", case=checked, device=device, dtype=dtype, mode=mode
                        )

    def selected(self, items: list[pytest.Item]) -> None:
        """Remember which runs of each case survived -k and the like: only those are checked."""
        for item in items:
            if isinstance(item, CaseItem):
                self.wanted[item.case, item.mode].add((item.device, item.dtype))

    def check(self, item: CaseItem) -> None:
        """Skip, pass or fail one item from its case's results."""
        unavailable = device_unavailable(item.device)
        if unavailable and self.plan.strict_devices:
            pytest.fail(f"--bc-device {item.device} was asked for, but {unavailable} (--bc-allow-skip skips it instead)", pytrace=False)
        if unavailable:
            skip(unavailable)
        result = self.result(item)
        if result.verdict == Verdict.SKIPPED:
            skip(result.message)
        if result.verdict in FAILING:
            raise GradientFailure(result)

    def result(self, item: CaseItem) -> Result:
        """The item's result, from a run of its case over every selected device and dtype."""
        key = (item.case, item.mode)
        if key not in self.results:
            runs = self.wanted.get(key) or {(item.device, item.dtype)}
            plan = replace(
                self.plan,
                devices=tuple(d for d in self.plan.devices if any(d == run[0] for run in runs)),
                dtypes=tuple(t for t in self.plan.dtypes if any(t == run[1] for run in runs)),
            )
            self.results[key] = {r.id: r for r in check_case(item.case, plan, item.mode)}
        return self.results[key][item.name]

    def explain(self, result: Result) -> str:
        """A failure as the text report shows it, under a headline that pytest's short summary
        quotes: the table, then the message, hints and notes."""
        from backprop_check.formats import text
        from backprop_check.records import Report

        if result.verdict == Verdict.ERROR:
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
    """A case file: one item per case × device × dtype, and one error item per failure."""

    def collect(self) -> Iterator[pytest.Item]:
        state = session_of(self.config)
        cases, failures = state.cases(self.path)
        yield from state.items(self, cases)
        for failure in failures:
            yield BrokenCase.from_parent(self, name=failure.case or "import", failure=failure)


class Broken(Exception):
    """What a BrokenCase raises at setup: the failure's one line, shown as it is."""


class BrokenCase(pytest.Item):
    """A case file that cannot be imported, or a case that cannot run: one error (raised at
    setup, so pytest counts an error, not a failed check), while the other files still run."""

    def __init__(self, *, failure: LoadFailure, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failure = failure

    def setup(self) -> None:
        raise Broken(f"{self.failure.where}: {self.failure.reason}")

    def runtest(self) -> None:
        """Never reached: setup raises."""

    def _repr_failure_py(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        # pytest shows a setup error through this method, not repr_failure: the line alone.
        if isinstance(excinfo.value, Broken):
            return str(excinfo.value)
        return super()._repr_failure_py(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, (self.failure.line - 1 if self.failure.line else None), self.name


class CaseItem(pytest.Item):
    """One case on one device in one dtype: `linear[cpu-float64]`; of a case with `order=` or
    `modes=`, one derivative or mode of it: `linear (order 2)[cpu-float64]`, `f (fwd)[…]`."""

    def __init__(self, *, case: Case, device: str, dtype: str, mode: str = "rev", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case, self.device, self.dtype, self.mode = case, device, dtype, mode

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


def named_folders(config: pytest.Config) -> list[Path]:
    """The folders given on the command line (not those pytest found in `testpaths`)."""
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return []
    base = config.invocation_params.dir
    folders = [(base / arg.split("::")[0]).resolve() for arg in config.args]
    return [folder for folder in folders if folder.is_dir()]


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith((".", "_")) for part in path.relative_to(folder).parts)


def _uses_package(path: Path) -> bool:
    try:
        return bool(USES_PACKAGE.search(path.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False
