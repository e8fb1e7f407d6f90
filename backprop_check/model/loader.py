"""Loading case files: each file is imported in isolation; a file that fails becomes a
`LoadFailure` naming the file and line, and every other file still loads."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from backprop_check.model.case import Case, collecting, stop_collecting
from backprop_check.errors import CaseTimeout, UsageError, line_in, one_line
from backprop_check.limits import time_limit
from backprop_check.selection import matches


@dataclass(frozen=True)
class LoadFailure:
    """A case file that could not be imported, or a case that cannot take part in a run."""

    file: str
    line: int | None
    reason: str
    case: str | None = None
    traceback: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


def case_files(path: Path) -> Iterator[Path]:
    """The case files under `path`: the file itself, or every `*.py` below a folder."""
    if path.is_dir():
        for file in sorted(path.rglob("*.py")):
            hidden = any(part.startswith((".", "_")) for part in file.relative_to(path).parts)
            if not hidden and file.name != "conftest.py":
                yield file
    else:
        yield path


def load_file(path: Path, timeout: float | None = None) -> list[Case] | LoadFailure:
    """Import one case file under a private module name and return the cases it defines."""
    shown = _shown(path)
    if not path.exists():
        return LoadFailure(shown, None, "no such file or folder")
    if path.suffix != ".py":
        return LoadFailure(shown, None, "not a Python file")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"_backprop_check_cases.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        return LoadFailure(shown, None, "cannot be imported")
    module = importlib.util.module_from_spec(spec)
    cases: list[Case] = []
    token = collecting(cases)
    sys.path.insert(0, str(path.parent.resolve()))  # so a case file can import its neighbours
    try:
        with time_limit(timeout, "importing the file"):
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        return LoadFailure(shown, exc.lineno, f"SyntaxError: {exc.msg}", traceback=_trace(exc))
    except BaseException as exc:  # noqa: BLE001 - a case file may raise anything, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        reason = str(exc) if isinstance(exc, CaseTimeout) else f"import failed: {one_line(exc)}"
        return LoadFailure(shown, line_in(str(path), exc), reason, traceback=_trace(exc))
    finally:
        stop_collecting(token)
        sys.path.remove(str(path.parent.resolve()))
    for found in cases:
        found.file = shown
    return cases


def load(
    targets: Iterable[str | Path | Case], timeout: float | None = None
) -> tuple[list[Case], list[LoadFailure]]:
    """Load every target (case files, folders or `Case` objects); duplicates become failures."""
    cases: list[Case] = []
    failures: list[LoadFailure] = []
    for target in targets:
        if isinstance(target, Case):
            cases.append(target)
            continue
        path = Path(target)
        if not path.exists():
            failures.append(LoadFailure(_shown(path), None, "no such file or folder"))
            continue
        for file in case_files(path):
            loaded = load_file(file, timeout)
            if isinstance(loaded, LoadFailure):
                failures.append(loaded)
            else:
                cases.extend(loaded)
    return _without_duplicates(cases, failures)


def inventory(
    targets: Iterable[str | Path | Case], cases: list[Case], failures: list[LoadFailure]
) -> dict[str, list[str]]:
    """Every case file that `load(targets)` read, with the names of the cases it defines (none
    for a file whose `@case` was lost); a file that could not be imported is left out, since
    what it defines is unknown. A baseline uses this to tell a case that is gone from one that
    was not selected."""
    broken = {failure.file for failure in failures if failure.case is None}
    files: dict[str, list[str]] = {}
    for target in targets:
        if isinstance(target, Case) or not Path(target).exists():
            continue
        for file in case_files(Path(target)):
            shown = _shown(file)
            if shown not in broken:
                files.setdefault(shown, [])
    for found in cases:
        if found.file in files:
            files[found.file].append(found.name)
    for failure in failures:  # a second case of the same name is defined too, if not checked
        if failure.case is not None and failure.file in files:
            files[failure.file].append(failure.case)
    return files


def _without_duplicates(
    cases: list[Case], failures: list[LoadFailure]
) -> tuple[list[Case], list[LoadFailure]]:
    first: dict[str, Case] = {}
    unique: list[Case] = []
    for found in cases:
        if found.name in first and first[found.name] is not found:
            failures.append(
                LoadFailure(
                    found.file or "<api>",
                    found.line,
                    f"two cases are named {found.name!r} (the other is at {first[found.name].where})",
                    case=found.name,
                )
            )
        elif found.name not in first:
            first[found.name] = found
            unique.append(found)
    return unique, failures


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def pick(paths: Sequence[str], select: str | None) -> tuple[list[Case], int]:
    """The cases under `paths` that `select` matches, and 2 when a file failed to load."""
    cases, failures = load(paths)
    for failure in failures:
        print(f"error: {failure.where}: {failure.reason}", file=sys.stderr)
    exact = [case for case in cases if case.name == select]  # `-k linear` means linear, not linear_mse
    chosen = exact or [case for case in cases if select is None or matches(select, case.name)]
    if not chosen and not failures:
        raise UsageError(f"no case in {', '.join(paths)} matches -k {select!r}" if select else f"no case in {', '.join(paths)}")
    return chosen, 2 if failures else 0
