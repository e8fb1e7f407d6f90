"""The thread policy (engine/threads.py): one thread for small work and busy machines, the cores
split between xdist workers, the user's opt-outs honoured, the setting restored after a check."""
from __future__ import annotations

import pytest
import torch

from backprop_check import case, run
from backprop_check.engine import threads
from backprop_check.errors import CaseError

BIG = threads.SMALL * 4


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quiet machine with 4 usable cores and torch's pool at 4."""
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy", lambda cores: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)


@pytest.mark.parametrize(
    "environ, elements, wanted",
    [
        pytest.param({}, 100, 1, id="small-work-runs-on-one-thread"),
        pytest.param({}, BIG, 4, id="large-work-keeps-torchs-pool"),
        pytest.param({"PYTEST_XDIST_WORKER_COUNT": "2"}, BIG, 2, id="two-xdist-workers-share-the-cores"),
        pytest.param({"PYTEST_XDIST_WORKER_COUNT": "8"}, BIG, 1, id="more-workers-than-cores-get-one-each"),
        pytest.param({"BACKPROP_CHECK_THREADS": "keep"}, 100, None, id="keep-leaves-torch-alone"),
        pytest.param({"BACKPROP_CHECK_THREADS": "3"}, 100, 3, id="a-number-is-used-as-it-is"),
        pytest.param({"BACKPROP_CHECK_THREADS": "auto"}, 100, 1, id="auto-is-the-default"),
        pytest.param({"OMP_NUM_THREADS": "2"}, 100, None, id="the-users-omp-setting-is-left-alone"),
        pytest.param({"MKL_NUM_THREADS": "2"}, BIG, None, id="the-users-mkl-setting-is-left-alone"),
    ],
)
def test_threads_for_the_work_at_hand(quiet: None, environ: dict[str, str], elements: int, wanted: int | None) -> None:
    assert threads.threads_for(elements, environ) == wanted


def test_a_busy_machine_runs_even_large_work_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy", lambda cores: True)
    assert threads.threads_for(BIG, {}) == 1


def test_the_machine_is_busy_when_its_load_exceeds_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert threads.busy(2) and not threads.busy(8)


@pytest.mark.parametrize("value", ["zero", "0", "-1", "1.5"])
def test_a_bad_setting_is_one_line_naming_the_variable(value: str) -> None:
    with pytest.raises(CaseError, match=f"BACKPROP_CHECK_THREADS='{value}' is not a number of threads"):
        threads.threads_for(100, {"BACKPROP_CHECK_THREADS": value})


def test_the_previous_setting_comes_back_even_when_the_block_raises() -> None:
    previous = torch.get_num_threads()
    wanted = 1 if previous != 1 else 2
    with pytest.raises(RuntimeError, match="boom"):
        with threads.chosen(100, {"BACKPROP_CHECK_THREADS": str(wanted)}) as inside:
            assert inside == torch.get_num_threads() == wanted
            raise RuntimeError("boom")
    assert torch.get_num_threads() == previous


def test_a_check_runs_on_the_chosen_threads_and_restores_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = torch.get_num_threads()
    wanted = 1 if previous != 1 else 2
    monkeypatch.setenv("BACKPROP_CHECK_THREADS", str(wanted))
    seen: list[int] = []

    @case(params={"w": [1.0, 2.0]}, data={"x": [3.0, 4.0]})
    def watched(w, x):  # noqa: ANN001, ANN202
        seen.append(torch.get_num_threads())
        return (w * x).sum()

    report = run([watched], devices=["cpu"], dtypes=["float64"], points=1)
    assert report.exit_code == 0
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == previous


def test_a_bad_setting_fails_each_case_with_its_line_and_the_run_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKPROP_CHECK_THREADS", "many")

    @case(params={"w": 1.0}, data={"x": 2.0})
    def doubled(w, x):  # noqa: ANN001, ANN202
        return w * x

    report = run([doubled], devices=["cpu"], dtypes=["float64"], points=0)
    (result,) = report.results
    assert result.verdict == "error" and "BACKPROP_CHECK_THREADS='many'" in result.message
    assert report.exit_code == 2
