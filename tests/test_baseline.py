"""Gradient baselines: the round trip, a drift (exit 1, message, obtained file), the tolerance,
missing and stale entries, and the usage errors."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from backprop_check import Report, Result
from backprop_check.commands.baseline import Baseline, Drift, Threshold
from backprop_check.commands.cli import main

CASES = '''
from backprop_check import case


@case(params={"w": 1.0, "b": [0.5, -0.5]}, data={"x": 3.0, "y": 2.0})
def affine(w, b, x, y):
    return ((w * x + b - y) ** 2).sum()


@affine.manual
def affine_manual(w, b, x, y):
    r = w * x + b - y
    return {"w": (2 * r * x).sum(), "b": 2 * r}


@case(params={"w": 1.0}, data={"x": 3.0, "y": 2.0})
def linear(w, x, y):
    return (w * x - y) ** 2
'''


@pytest.fixture
def where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(CASES)
    return tmp_path


def check(*options: str) -> int:
    return main(["run", "models.py", "--points", "0", "--device", "cpu", "--dtype", "float64", "--format", "json", *options])


def results(out: str) -> dict[str, dict]:
    return {f"{r['case']}[{r['device']}-{r['dtype']}]": r for r in json.loads(out)["results"]}


def stored(path: Path) -> dict:
    return json.loads(path.read_text())["cases"]


def test_the_baseline_round_trips(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check("--baseline", "gradients.json", "--update-baseline") == 0
    assert "wrote 2 entries (0 changed, 2 added, 0 dropped, 0 kept)" in capsys.readouterr().err
    text = (where / "gradients.json").read_text()
    assert json.loads(text)["cases"]["affine[cpu-float64]"] == {"file": "models.py", "loss": 2.5, "gradients": {"b": [3.0, 1.0], "w": 12.0}}
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"  # diffable: sorted, one number a line
    assert check("--baseline", "gradients.json") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert all(r["verdict"] == "ok" and r["notes"] == [] for r in results(captured.out).values())
    assert not (where / "gradients.obtained.json").exists()


def test_a_drift_fails_the_run_even_when_the_sources_agree(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    baseline = json.loads((where / "gradients.json").read_text())
    baseline["cases"]["affine[cpu-float64]"]["gradients"]["b"][1] = 1.000001
    (where / "gradients.json").write_text(json.dumps(baseline))
    capsys.readouterr()

    assert check("--baseline", "gradients.json") == 1
    captured = capsys.readouterr()
    drifted = results(captured.out)["affine[cpu-float64]"]
    assert drifted["verdict"] == "mismatch" and drifted["culprit"] == "autograd"
    command = "backprop-check run models.py --device cpu --dtype float64 --baseline gradients.json --update-baseline"
    assert drifted["message"] == (
        "affine drifted from the baseline gradients.json: dloss/db[1] was 1.000001 in the baseline, now 1.0; "
        "differs by 1e-06, allowed 1.03e-10 (float64: rtol 1e-10, atol 1e-12·max(1, max|baseline|)); "
        "1 of 2 elements drifted; the three sources still agree with each other; "
        f"update the baseline with: {command}"
    )
    assert [c["name"] for c in drifted["checks"] if c["verdict"] == "mismatch"] == ["baseline b"]
    assert results(captured.out)["linear[cpu-float64]"]["verdict"] == "ok"
    assert f"this run's values are in gradients.obtained.json; accept them with: {command}" in captured.err
    assert stored(where / "gradients.obtained.json")["affine[cpu-float64]"]["gradients"]["b"] == [3.0, 1.0]

    assert main(shlex.split(command)[1:]) == 0  # the printed command accepts the new values
    assert stored(where / "gradients.json")["affine[cpu-float64]"]["gradients"]["b"] == [3.0, 1.0]
    assert not (where / "gradients.obtained.json").exists()


def test_a_drift_of_the_loss_alone_has_no_culprit(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    baseline = json.loads((where / "gradients.json").read_text())
    baseline["cases"]["linear[cpu-float64]"]["loss"] = 1.5
    (where / "gradients.json").write_text(json.dumps(baseline))
    capsys.readouterr()
    assert check("--baseline", "gradients.json") == 1
    drifted = results(capsys.readouterr().out)["linear[cpu-float64]"]
    assert drifted["culprit"] is None
    assert "the loss was 1.5 in the baseline, now 1.0" in drifted["message"]


def test_baseline_rtol_loosens_the_gate(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    baseline = json.loads((where / "gradients.json").read_text())
    baseline["cases"]["linear[cpu-float64]"]["gradients"]["w"] = 6.000001
    (where / "gradients.json").write_text(json.dumps(baseline))
    assert check("--baseline", "gradients.json", "--baseline-rtol", "1e-6") == 0
    assert check("--baseline", "gradients.json") == 1


@pytest.mark.parametrize(
    ("dtype", "now", "drifts"),
    [
        pytest.param("float64", 1.0 + 1e-12, False, id="float64-rounding"),
        pytest.param("float64", 1.0 + 1e-8, True, id="float64-drift"),
        pytest.param("float32", 1.0 + 1e-6, False, id="float32-rounding"),
        pytest.param("float32", 1.0 + 1e-4, True, id="float32-drift"),
    ],
)
def test_the_tolerance_follows_the_dtype(dtype: str, now: float, drifts: bool) -> None:
    assert isinstance(Threshold().fails("w", dtype, [0.5, 1.0], [0.5, now]), Drift) is drifts


def test_a_changed_shape_is_a_drift() -> None:
    assert Threshold().fails("b", "float64", [1.0, 2.0], [1.0, 2.0, 3.0]) == "b changed shape from [2] to [3]"


def test_the_worst_element_is_named_by_its_index() -> None:
    drift = Threshold().fails("W", "float64", [[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.5]])
    assert isinstance(drift, Drift)
    assert (drift.label, drift.stored, drift.now, drift.bad, drift.size) == ("W[1, 1]", 4.0, 4.5, 1, 4)


def test_a_missing_entry_is_a_note_unless_strict(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    baseline = json.loads((where / "gradients.json").read_text())
    del baseline["cases"]["linear[cpu-float64]"]
    (where / "gradients.json").write_text(json.dumps(baseline))
    capsys.readouterr()

    assert check("--baseline", "gradients.json") == 0
    captured = capsys.readouterr()
    assert "1 results not in it (linear[cpu-float64]); add them with:" in captured.err
    assert results(captured.out)["linear[cpu-float64]"]["notes"][0].startswith("linear is not in the baseline gradients.json")

    assert check("--baseline", "gradients.json", "--baseline-strict") == 1
    missing = results(capsys.readouterr().out)["linear[cpu-float64]"]
    assert missing["verdict"] == "mismatch" and missing["culprit"] is None
    assert missing["message"].endswith("(--baseline-strict)")


def test_a_stale_entry_is_listed_and_dropped_by_an_update(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    baseline = json.loads((where / "gradients.json").read_text())
    baseline["cases"]["renamed[cpu-float64]"] = {"loss": 1.0, "gradients": {"w": 1.0}}
    (where / "gradients.json").write_text(json.dumps(baseline))
    capsys.readouterr()

    assert check("--baseline", "gradients.json") == 0
    captured = capsys.readouterr()
    assert "1 stale entries, whose case is gone (renamed[cpu-float64]); --update-baseline drops them" in captured.err
    assert json.loads(captured.out)["baseline"]["stale"] == ["renamed[cpu-float64]"]
    assert check("--baseline", "gradients.json", "--update-baseline") == 0
    assert "dropped: renamed[cpu-float64]" in capsys.readouterr().err
    assert sorted(stored(where / "gradients.json")) == ["affine[cpu-float64]", "linear[cpu-float64]"]


def test_an_update_keeps_the_entries_of_runs_without_values() -> None:
    skipped = Result(case="linear", device="cuda", dtype="float64", verdict="skipped")
    checked = Result(case="linear", device="cpu", dtype="float64", verdict="ok", reference={"loss": 1.0, "gradients": {"w": 6.0}})
    old = {"linear[cuda-float64]": {"loss": 1.0, "gradients": {"w": 6.0}}, "gone[cpu-float64]": {}}
    report = Report(results=[checked, skipped], files={"models.py": ["linear"]})
    entries = Baseline(Path("gradients.json"), Threshold()).entries(report, old)
    assert entries == {"linear[cpu-float64]": {"loss": 1.0, "gradients": {"w": 6.0}}, "linear[cuda-float64]": old["linear[cuda-float64]"]}


def test_an_update_after_k_touches_only_the_results_it_ran(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    baseline = json.loads((where / "gradients.json").read_text())
    baseline["cases"]["linear[cpu-float64]"]["loss"] = 99.0  # so that a rewrite would show
    baseline["cases"]["linear[cuda-float32]"] = {"file": "models.py", "loss": 1.0, "gradients": {"w": 6.0}}
    (where / "gradients.json").write_text(json.dumps(baseline))
    capsys.readouterr()
    assert check("--baseline", "gradients.json", "--update-baseline", "-k", "affine") == 0
    assert "wrote 3 entries (0 changed, 0 added, 0 dropped, 2 kept)" in capsys.readouterr().err
    after = stored(where / "gradients.json")
    assert after["linear[cpu-float64]"]["loss"] == 99.0
    assert after["linear[cuda-float32]"] == baseline["cases"]["linear[cuda-float32]"]
    # Entries that -k, --device or --dtype left out are not stale: their cases are still there.
    assert check("--baseline", "gradients.json", "-k", "affine") == 0
    captured = capsys.readouterr()
    assert "stale" not in captured.err
    assert json.loads(captured.out)["baseline"]["stale"] == []


def test_an_entry_is_stale_when_its_case_is_gone_from_its_file(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    (where / "models.py").write_text(CASES.replace("def linear(", "def renamed("))
    capsys.readouterr()
    assert check("--baseline", "gradients.json", "-k", "affine") == 0
    assert "1 stale entries, whose case is gone (linear[cpu-float64])" in capsys.readouterr().err


def test_entries_of_files_the_run_did_not_read_are_kept(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (where / "other.py").write_text(CASES.replace("def affine", "def other").replace("@affine", "@other").replace("def linear", "def lonely"))
    assert main(["run", "models.py", "other.py", "--points", "0", "--device", "cpu", "--dtype", "float64", "--baseline", "gradients.json", "--update-baseline"]) == 0
    capsys.readouterr()
    assert check("--baseline", "gradients.json", "--update-baseline") == 0  # models.py only
    assert "wrote 4 entries (0 changed, 0 added, 0 dropped, 2 kept)" in capsys.readouterr().err
    assert sorted(stored(where / "gradients.json")) == ["affine[cpu-float64]", "linear[cpu-float64]", "lonely[cpu-float64]", "other[cpu-float64]"]
    (where / "other.py").unlink()
    assert check("--baseline", "gradients.json", "--update-baseline") == 0
    assert "dropped: lonely[cpu-float64], other[cpu-float64]" in capsys.readouterr().err


def test_a_file_that_fails_to_import_keeps_its_entries(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check("--baseline", "gradients.json", "--update-baseline")
    (where / "models.py").write_text(CASES + "\nraise RuntimeError('broken for now')\n")
    capsys.readouterr()
    assert check("--baseline", "gradients.json", "--update-baseline") == 2
    assert sorted(stored(where / "gradients.json")) == ["affine[cpu-float64]", "linear[cpu-float64]"]


def test_missing_entries_reach_the_junit_and_markdown_reports(where: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "models.py", "--points", "0", "--device", "cpu", "--dtype", "float64", "--baseline", "gradients.json"]
    assert main([*base, "--format", "junit"]) == 0
    assert '<property name="baseline.missing" value="affine[cpu-float64] linear[cpu-float64]" />' in capsys.readouterr().out
    assert main([*base, "--format", "markdown"]) == 0
    assert "**baseline gradients.json: 2 results not in it: affine[cpu-float64], linear[cpu-float64]**" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("options", "says"),
    [
        pytest.param(["--update-baseline"], "--update-baseline needs --baseline FILE", id="update-without-file"),
        pytest.param(["--baseline", "corrupt.json"], "--baseline corrupt.json: not a backprop-check baseline", id="corrupt-file"),
        pytest.param(["--baseline", "gradients.json", "--baseline-rtol", "-1"], "--baseline-rtol must be 0 or more", id="negative-rtol"),
    ],
)
def test_a_baseline_usage_error_is_one_line(where: Path, capsys: pytest.CaptureFixture[str], options: list[str], says: str) -> None:
    (where / "corrupt.json").write_text("{not json")
    assert check(*options) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"backprop-check: error: {says}") and err.count("\n") == 1
