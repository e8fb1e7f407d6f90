"""Pictures rendered to files and read back: their size, and the data on their axes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from backprop_check.commands.cli import main

matplotlib = pytest.importorskip("matplotlib")
from matplotlib import image  # noqa: E402

from backprop_check.formats import plot  # noqa: E402
from backprop_check.commands.explain import step_scan  # noqa: E402
from backprop_check.model.loader import load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SGD = str(ROOT / "cases" / "sgd_trace.py")
CURVED = '''
import torch
from backprop_check import case


@case(params={"w": 0.3}, data={"x": 1.7})
def curved(w, x):
    return torch.exp(w * x)


@curved.manual
def curved_manual(w, x):
    return {"w": x * torch.exp(w * x)}
'''


def test_trace_plot_is_an_800_by_600_png_of_the_loss_and_agreement_per_step(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    picture, record = tmp_path / "trace.png", tmp_path / "trace.json"
    argv = ["trace", SGD, "--epochs", "3", "--lr", "0.01", "--per-sample", "--plot", str(picture), "--json", str(record)]
    assert main(argv) == 0
    assert image.imread(picture).shape[:2] == (600, 800)
    trace = json.loads(record.read_text())
    figure = plot.trace_figure(trace)
    top, bottom = figure.axes
    assert list(top.lines[0].get_ydata()) == [step["loss"] for step in trace["steps"]]
    assert len(top.lines[0].get_xdata()) == 9  # 3 epochs × 3 samples
    assert [line.get_label() for line in bottom.lines] == ["manual vs numerical", "autograd vs numerical", "manual vs autograd"]
    assert all(0 < y < 1e-4 for line in bottom.lines for y in line.get_ydata())  # agree at every step


def test_step_picture_marks_the_chosen_step_and_the_error_bar(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "curved.py"
    path.write_text(CURVED)
    picture = tmp_path / "steps.png"
    assert main(["explain", str(path), "--plot-steps", str(picture)]) == 0
    assert f"step picture written to {picture}" in capsys.readouterr().out
    assert image.imread(picture).shape[:2] == (600, 800)
    (case,), _ = load([str(path)])
    scan = step_scan(case)
    assert scan.label == "w" and scan.against == "autograd" and scan.chosen == 2.0**-6
    # Truncation: the central difference's error falls as h² while h is large ...
    big = dict(zip(scan.steps, scan.central))
    assert big[2.0**-4] / big[2.0**-5] == pytest.approx(4, rel=0.05)
    # ... and at the chosen step the estimate the numerical source uses (Richardson's) is inside its error bar.
    assert dict(zip(scan.steps, scan.richardson))[scan.chosen] < scan.error_bar < big[scan.chosen]
    figure = plot.steps_figure(scan)
    (axes,) = figure.axes
    labels = [line.get_label() for line in axes.lines]
    assert labels[:2] == ["central difference D(h)", "Richardson over h, h/2, h/4 (the estimate, O(h⁶))"]
    chosen = axes.lines[2]
    assert list(chosen.get_xdata()) == [scan.chosen, scan.chosen] and "chosen step" in labels[2]
    assert list(axes.lines[3].get_ydata()) == [scan.error_bar, scan.error_bar]


def test_without_matplotlib_a_plot_option_says_in_one_line_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["trace", SGD, "--epochs", "1", "--lr", "0.01", "--plot", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["backprop-check: error: pictures need matplotlib, which is not installed: pip install 'backprop_check[plot]'"]
    assert not (tmp_path / "t.png").exists()


def test_a_trace_that_stops_at_step_1_draws_its_one_step_in_both_panels(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    record = tmp_path / "trace.json"
    tutorial_bug = str(ROOT / "examples" / "tutorial_bug.py")
    assert main(["trace", tutorial_bug, "--epochs", "20", "--lr", "0.01", "--json", str(record)]) == 1
    trace = json.loads(record.read_text())
    assert len(trace["steps"]) == 1
    _, bottom = plot.trace_figure(trace).axes
    drawn = [line for line in bottom.lines if line.get_label().endswith("vs numerical") or line.get_label() == "manual vs autograd"]
    assert drawn, "the lower panel has no line of the sources' agreement"
    # One point makes no line: each is visible only as a marker.
    assert all(line.get_marker() not in (None, "", "None", " ") for line in drawn)
    assert any(float(line.get_ydata()[0]) > 0.5 for line in drawn)  # manual is off by 3× the true gradient there
