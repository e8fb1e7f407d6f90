"""`backprop-check explain`: the seeds' backpropagation table, node by node."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from backprop_check.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
LINEAR = str(ROOT / "cases" / "linear.py")


def table(output: str) -> dict[str, list[str]]:
    """Rows of the table by node name; cells split on runs of two or more spaces."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("node "))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_the_linear_example_reads_as_the_seed(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", LINEAR, "-k", "linear"])
    output = capsys.readouterr().out
    assert code == 0
    assert output.startswith("linear (")
    assert "at the given point (w = 1; x = 1, y = 2), float64 on cpu" in output
    rows = table(output)
    assert list(rows) == ["loss", "s", "y_hat", "w"]  # from the loss back to the parameter
    assert rows["loss"] == ["1"]  # loss = 1
    assert rows["s"] == ["-1", "dloss/ds = -2", "-2", "-2", "-2", "ok"]  # s = −1, dloss/ds = −2
    assert rows["y_hat"] == ["1", "ds/dy_hat = 1", "-2", "-2", "-2", "ok"]  # ŷ = 1, dloss/dŷ = −2
    assert rows["w"] == ["1", "dy_hat/dw = 1", "-2", "-2", "-2", "ok"]  # dloss/dw = −2
    assert output.rstrip().endswith("all three agree")


def test_exercise_4_1_shows_its_local_gradients(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", LINEAR, "-k", "exercise_4_1"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["s"][:2] == ["-2", "dloss/ds = -4"]  # dloss/dr = 2r = −4
    assert rows["w"][1:] == ["dy_hat/dw = 2", "-8", "-8", "-8", "ok"]  # dŷ/dw = 2, dloss/dw = −8


def test_a_tensor_row_shows_its_worst_element_and_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", LINEAR, "-k", "linear_mse"]) == 0
    rows = table(capsys.readouterr().out)
    tensor_rows = [name for name in rows if name.startswith("s[")]
    assert len(tensor_rows) == 1 and rows[tensor_rows[0]][0].endswith("(of 4 elements)")
    assert rows["w"] == ["0", "-30", "-30", "-30", "ok"]  # dJ/dw = −30


def test_a_wrong_manual_gradient_is_marked_and_explained(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", str(ROOT / "examples" / "tutorial_bug.py")])
    output = capsys.readouterr().out
    assert code == 1
    assert table(output)["w"][-4:] == ["-120", "-30", "-30", "✗ manual"]
    assert "✗ manual is the odd one out" in output
    assert "hint: the manual dloss/dw is 4× the true gradient" in output


def test_no_matching_case_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", LINEAR, "-k", "no_such_case"]) == 2
    assert "no case in" in capsys.readouterr().err


def test_a_file_that_does_not_load_is_reported_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    assert main(["explain", str(broken)]) == 2
    assert "broken.py:1: SyntaxError" in capsys.readouterr().err
