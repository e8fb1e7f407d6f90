"""`backprop-check trace`: gradient descent replayed, all three gradients checked at every step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from backprop_check.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
SGD = str(ROOT / "cases" / "sgd_trace.py")
TUTORIAL_BUG = str(ROOT / "examples" / "tutorial_bug.py")
SEED_RUN = ["trace", SGD, "--lr", "0.01", "--per-sample", "--predict", "4"]

# Seed 003's published output, as its loop printed it (float32, w = 1, lr = 0.01).
PUBLISHED = """\
predict (before training) 4 4.0
\tgrad: 1.0 2.0 -2.0
\tgrad: 2.0 4.0 -7.840000152587891
\tgrad: 3.0 6.0 -16.228801727294922
progress: 0 7.315943717956543
\tgrad: 1.0 2.0 -1.478623867034912
\tgrad: 2.0 4.0 -5.796205520629883
\tgrad: 3.0 6.0 -11.998146057128906
progress: 1 3.9987640380859375
\tgrad: 1.0 2.0 -1.0931644439697266
\tgrad: 2.0 4.0 -4.285204887390137
\tgrad: 3.0 6.0 -8.870372772216797
progress: 2 2.1856532096862793
\tgrad: 1.0 2.0 -0.8081896305084229
\tgrad: 2.0 4.0 -3.1681032180786133
\tgrad: 3.0 6.0 -6.557973861694336
progress: 3 1.1946394443511963
\tgrad: 1.0 2.0 -0.5975041389465332
\tgrad: 2.0 4.0 -2.3422164916992188
\tgrad: 3.0 6.0 -4.848389625549316
progress: 4 0.6529689431190491
\tgrad: 1.0 2.0 -0.4417421817779541
\tgrad: 2.0 4.0 -1.7316293716430664
\tgrad: 3.0 6.0 -3.58447265625
progress: 5 0.35690122842788696
\tgrad: 1.0 2.0 -0.3265852928161621
\tgrad: 2.0 4.0 -1.2802143096923828
\tgrad: 3.0 6.0 -2.650045394897461
"""


def test_the_seeds_training_loop_is_reproduced_to_the_printed_digits(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*SEED_RUN, "--epochs", "100"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert code == 0
    # The seed's prints, with one line naming the columns after the first and one closing line.
    assert lines[1] == "columns: grad: x y dloss/dw; progress: epoch loss"
    assert [lines[0], *lines[2 : len(PUBLISHED.splitlines()) + 1]] == PUBLISHED.splitlines()
    assert lines[-1] == "checked 300 steps (100 epochs × 3 samples): manual, numerical and autograd agree at every step"
    assert lines[-2].startswith("predict (after training) 4 ")
    assert f"{float(lines[-2].split()[-1]):.8g}" == "7.9999986"  # DESIGN: predict(4) = 7.9999986
    # Near the minimum a float32 gradient is a small difference of large terms: the tolerance
    # allows for that rounding, so the 300 steps run through without a false stop.
    assert captured.err == ""


def test_the_trace_is_written_as_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    assert main([*SEED_RUN, "--epochs", "2", "--json", str(path)]) == 0
    trace = json.loads(path.read_text())
    assert [step["gradients"]["w"]["autograd"] for step in trace["steps"][:3]] == [
        -2.0,
        -7.840000152587891,
        -16.228801727294922,
    ]
    assert trace["steps"][1]["gradients"]["w"]["manual"] == pytest.approx(-7.84, rel=1e-6)
    assert [epoch["loss"] for epoch in trace["progress"]] == [7.315943717956543, 3.9987640380859375]
    assert (trace["predict"]["x"], trace["predict"]["before"]) == ("4", 4.0)
    assert 4.0 < trace["predict"]["after"] < 8.0  # two epochs on the way to w = 2
    assert (trace["stopped"], trace["exit_code"], trace["dtype"]) == (None, 0, "float32")


def test_the_tutorials_gradient_stops_the_trace_at_the_first_step(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    code = main(["trace", TUTORIAL_BUG, "--epochs", "20", "--lr", "0.01", "--json", str(path)])
    output = capsys.readouterr().out
    assert code == 1
    assert "✗ manual is the odd one out at the point of step 1 (epoch 0)" in output
    assert "hint: the manual dloss/dw is 4× the true gradient" in output
    assert output.rstrip().endswith("stopped at step 1 (epoch 0): the manual gradient is the odd one out")
    trace = json.loads(path.read_text())
    assert len(trace["steps"]) == 1
    assert (trace["stopped"]["step"], trace["stopped"]["culprit"]) == (1, "manual")


def test_every_k_thins_the_printed_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", SGD, "--epochs", "5", "--lr", "0.01", "--per-sample", "--every", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("progress:")] == ["0", "2", "4"]
    assert sum(line.startswith("\tgrad:") for line in lines) == 9


def test_a_full_batch_step_sees_all_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", SGD, "--epochs", "1", "--lr", "0.01"]) == 0
    assert capsys.readouterr().out.splitlines() == [  # Σ over 3 samples
        "columns: grad: dloss/dw; progress: epoch loss",
        "\tgrad: -28.0",
        "progress: 0 14.0",
        "checked 1 step: manual, numerical and autograd agree at every step",
    ]


BATCHED = """
import torch
from backprop_check import case


@case(params={"W": [[1.0, -0.5], [0.25, 2.0]]}, data={"X": [[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], "y": [1.0, 0.0, 2.0]})
def batched_regression(W, X, y):
    return ((X @ W).sum(dim=1) - y).pow(2).mean()


@batched_regression.manual
def batched_regression_manual(W, X, y):
    residual = (X @ W).sum(dim=1) - y          # one per row of the batch
    dloss_dout = 2 * residual[:, None] / X.shape[0]
    return {"W": X.T @ dloss_dout.expand(-1, W.shape[1])}
"""


def test_per_sample_keeps_the_batch_dimension_so_a_batch_manual_works(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "batched.py"
    path.write_text(BATCHED)
    record = tmp_path / "trace.json"
    assert main(["trace", str(path), "--epochs", "2", "--lr", "0.1", "--per-sample", "--json", str(record)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "columns: grad: X y dloss/dW; progress: epoch loss"
    assert "\tgrad: X[1×2, norm" in out  # sample i arrives as a batch of one row
    assert out.rstrip().endswith("checked 6 steps (2 epochs × 3 samples): manual, numerical and autograd agree at every step")
    assert len(json.loads(record.read_text())["steps"]) == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["trace", str(ROOT / "cases" / "linear.py"), "-k", "linear", "--per-sample"], "every datum is a scalar", id="per-sample-needs-a-sample-dimension"),
        pytest.param(["trace", str(ROOT / "cases" / "linear.py")], "3 match (linear, exercise_4_1, linear_mse)", id="one-case-at-a-time"),
        pytest.param(["trace", TUTORIAL_BUG, "--predict", "4"], "marks no such node", id="predict-needs-a-y_hat-node"),
        pytest.param(["trace", SGD, "--dtype", "int8"], "unknown dtype 'int8'", id="unknown-dtype"),
    ],
)
def test_a_usage_mistake_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--epochs", "1", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_diverging_descent_ends_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["trace", SGD, "--epochs", "400", "--lr", "1.0", "--per-sample"])
    err = capsys.readouterr().err
    assert code == 2
    assert "gradient descent diverged (a smaller --lr?)" in err and len(err.strip().splitlines()) == 1


def test_a_numpy_case_closes_with_the_two_sources_it_compared(capsys: pytest.CaptureFixture[str]) -> None:
    numpy_tutorial = str(Path(__file__).resolve().parents[1] / "examples" / "numpy_tutorial.py")
    assert main(["trace", numpy_tutorial, "-k", "tutorial_fixed", "--epochs", "2", "--lr", "0.01"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == "checked 2 steps: manual and numerical agree at every step"  # autograd does not apply
