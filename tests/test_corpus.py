"""The planted-bug corpus: every case gets the verdict and culprit its file promises.

Each file in tests/corpus/ declares `EXPECTED = {case: (verdict, culprit)}`. The file is run
through the Python API once per dtype, and every result that was not skipped must carry the
expected verdict and culprit. A case named in the file's `MAY_PASS_ONCE` hides its bug at one
point (the forgot-x case at its given x = 1, the stateful case on its first call): per device,
at most one of its results may be ok, and at least one must show the bug.
"""
from __future__ import annotations

import importlib.util
from collections import Counter, defaultdict
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from backprop_check import run

if TYPE_CHECKING:
    from backprop_check import Report, Result

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CORPUS = TESTS / "corpus"
BROKEN = CORPUS / "broken"
DTYPES = ("float32", "float64")
UNIMPORTABLE = ("syntax_error.py", "import_raises.py")
# The corpus files that import (broken/bad_cases.py too): each holds an EXPECTED table.
CORPUS_FILES = [p for p in sorted(CORPUS.glob("*.py")) if p.name != "conftest.py"]
CORPUS_FILES.append(BROKEN / "bad_cases.py")


def load(path: Path) -> ModuleType:
    """Import a corpus file by path, under a name of its own, to read its EXPECTED table."""
    spec = importlib.util.spec_from_file_location(f"_corpus_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODULES = {path: load(path) for path in CORPUS_FILES}


@cache
def report(path: Path, dtype: str) -> Report:
    return run([str(path)], dtypes=[dtype], seed=0)


def checked(path: Path, dtype: str, name: str) -> list[Result]:
    """The results of case `name` that were not skipped."""
    return [r for r in report(path, dtype).results if r.case == name and r.verdict != "skipped"]


def describe(results: list[Result]) -> str:
    return "\n".join(f"  {r.device} {r.dtype}: {r.verdict} (culprit {r.culprit}) {r.message}" for r in results)


def corpus_cases() -> Iterator[Any]:
    for path, module in MODULES.items():
        may_pass_once = getattr(module, "MAY_PASS_ONCE", {})
        for name, expected in module.EXPECTED.items():
            for dtype in DTYPES:
                yield pytest.param(path, name, expected, name in may_pass_once, dtype, id=f"{name}-{dtype}")


@pytest.mark.parametrize(("path", "name", "expected", "may_pass_once", "dtype"), list(corpus_cases()))
def test_case_gets_its_expected_verdict(
    path: Path, name: str, expected: tuple[str, str | None], may_pass_once: bool, dtype: str
) -> None:
    results = checked(path, dtype, name)
    assert results, f"{name}: no {dtype} result that was not skipped"
    assert {r.dtype for r in results} == {dtype}
    got = [(r.verdict, r.culprit) for r in results]
    if not may_pass_once:
        assert all(g == expected for g in got), f"{name}: expected {expected}, got\n{describe(results)}"
        return
    by_device: dict[str, Counter[tuple[str, str | None]]] = defaultdict(Counter)
    for r in results:
        by_device[r.device][(r.verdict, r.culprit)] += 1
    for device, counts in by_device.items():
        assert set(counts) <= {expected, ("ok", None)}, f"{name} on {device}:\n{describe(results)}"
        assert counts[("ok", None)] <= 1, f"{name} on {device} passed more than once:\n{describe(results)}"
        assert counts[expected] >= 1, f"{name} on {device} never showed its bug:\n{describe(results)}"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_expected_names_every_case_in_the_file(path: Path) -> None:
    reported = {r.case for r in report(path, "float64").results}
    assert reported == set(MODULES[path].EXPECTED)


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_exit_code_follows_the_worst_verdict(path: Path) -> None:
    verdicts = {verdict for verdict, _ in MODULES[path].EXPECTED.values()}
    expected = 2 if "error" in verdicts else 1 if "mismatch" in verdicts else 0
    assert report(path, "float64").exit_code == expected


def test_case_names_are_unique_across_the_corpus() -> None:
    names = Counter(name for module in MODULES.values() for name in module.EXPECTED)
    assert [name for name, n in names.items() if n > 1] == []


@pytest.mark.parametrize("name", UNIMPORTABLE)
def test_a_file_that_cannot_be_imported_is_one_line_error(name: str) -> None:
    result = run([str(BROKEN / name)], seed=0)
    results = [r for r in result.results if r.verdict != "skipped"]
    assert results, describe(result.results)
    assert all(r.verdict == "error" for r in results), describe(results)
    assert all(name in f"{r.file} {r.message}" for r in results), describe(results)
    assert all("Traceback" not in r.message and "\n" not in r.message.strip() for r in results)
    assert result.exit_code == 2


def test_other_files_still_run_beside_a_broken_one() -> None:
    result = run([str(BROKEN / "syntax_error.py"), str(BROKEN / "bad_cases.py")], dtypes=["float64"], seed=0)
    neighbour = [r for r in result.results if r.case == "broken_neighbour_ok" and r.verdict != "skipped"]
    assert neighbour and all(r.verdict == "ok" for r in neighbour), describe(result.results)
    assert result.exit_code == 2


def test_builtin_cases_are_all_ok() -> None:
    result = run([str(ROOT / "cases")], dtypes=list(DTYPES), seed=0)
    wrong = [r for r in result.results if r.verdict not in ("ok", "skipped")]
    assert wrong == [], describe(wrong)
    seeds = {"linear", "exercise_4_1", "linear_mse", "exercise_4_2", "exercise_4_3", "two_layer_linear"}
    assert seeds <= {r.case for r in result.results}
    assert result.exit_code == 0


def test_tutorial_gradient_is_blamed_on_the_manual_derivation() -> None:
    result = run([str(ROOT / "examples" / "tutorial_bug.py")], dtypes=list(DTYPES), seed=0)
    results = [r for r in result.results if r.verdict != "skipped"]
    assert results
    assert all((r.verdict, r.culprit) == ("mismatch", "manual") for r in results), describe(results)
    assert result.exit_code == 1
