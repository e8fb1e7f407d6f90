"""What every test here shares: a report into a pipe is 100 columns wide unless a test says otherwise.

pytest-xdist's workers run with `COLUMNS` set to the controller's width (80 when it has no
terminal), and a report into a pipe follows `COLUMNS`, as `shutil.get_terminal_size` does: a
test that reads wrapped lines would see other line breaks under `-n 2` than without it.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_columns_from_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
