"""The pytest plugin (entry point `pytest11`): `pytest cases/` checks every case.

Each case × device × dtype is an item (`cases/linear.py::linear[cpu-float64]`); a failure shows
the harness's table and message; an unavailable device is a skip with its reason. The run
options are `backprop_check.options.OPTIONS` under a `--bc-` prefix (`--bc-dtype float64`).
Each hook hands its work to the `CheckSession` (session.py), which owns the state.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .options import OPTIONS
from .session import KEY, CaseFile, CheckSession, session_of


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the shared run options as `--bc-NAME`, and where case files live."""
    group = parser.getgroup("backprop-check", "gradient checks of case files (backprop-check)")
    for option in OPTIONS:
        if option.flag:
            group.addoption(f"--bc-{option.name}", dest=f"bc_{option.dest}", action="store_true", help=option.help)
        else:
            group.addoption(
                f"--bc-{option.name}",
                dest=f"bc_{option.dest}",
                default=option.default,
                type=option.type,
                metavar=option.metavar,
                action="append" if option.repeat else "store",
                help=option.help,
            )
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
