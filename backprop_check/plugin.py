"""The pytest plugin (entry point `pytest11`): `pytest cases/` checks every case.

Each case × device × dtype is an item (`cases/linear.py::linear[cpu-float64]`); a failure shows
the harness's table and message; an unavailable device is a skip with its reason. The run
options are `backprop_check.options.OPTIONS` under a `--bc-` prefix (`--bc-dtype float64`).
Each hook hands its work to the `CheckSession` (session.py), which owns the state.

Loading the plugin imports no torch (every pytest process loads it, also for projects that never
check a case): torch comes with the first case file collected. Under xdist, `-n N` with the
default `--dist load` sends all of a case's items to one worker (CaseScheduling), so that each
case is checked once; any other `--dist` is left as asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backprop_check.options import register
from backprop_check.commands.session import KEY, CaseFile, CheckSession, session_of


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the shared run options as `--bc-NAME`, and where case files live."""
    group = parser.getgroup("backprop-check", "gradient checks of case files (backprop-check)")
    register(group.addoption, prefix="bc-")  # the CLI's options (options.py), as --bc-NAME
    parser.addini("backprop_check_paths", "folders of case files (default: cases)", type="paths", default=[])


def pytest_configure(config: pytest.Config) -> None:
    """Create the session object that owns the plugin's state."""
    config.stash[KEY] = CheckSession(config)


def pytest_report_header(config: pytest.Config) -> str:
    """Say what the plugin will check."""
    return session_of(config).header()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> CaseFile | None:
    """Collect a case file; leave every other file to pytest."""
    if session_of(parent.config).is_case_file(file_path, parent.session.isinitpath(file_path)):
        return CaseFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note which runs of each case were selected, so that a case runs only those."""
    session_of(config).selected(items)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `--dist load`, keep each case's items on one worker (see CaseScheduling)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    plan = session_of(config).plan
    runs = tuple(f"[{device}-{dtype}]" for device in plan.devices for dtype in plan.dtypes)

    class CaseScheduling(LoadScopeScheduling):
        """`load`, except that the items of one case (`f.py::linear[cpu-float64]`,
        `f.py::linear[cpu-float32]`, ...) are one unit of work: a worker checks the case once
        for all its runs, where `load` would have two workers check it twice."""

        def _split_scope(self, nodeid: str) -> str:
            for run in runs:
                if nodeid.endswith(run):
                    return nodeid[: -len(run)]
            return nodeid

    return CaseScheduling(config, log)
