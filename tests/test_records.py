"""The records, unit by unit: Check, Result and Report built by hand, their dicts and the JSON
they make (a round trip through `json.loads`), the summary and the exit code."""
from __future__ import annotations

import json
import math

import pytest

from backprop_check.formats import json as json_format
from backprop_check.records import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_MISMATCH,
    EXIT_NOT_CHECKED,
    EXIT_OK,
    VERDICTS,
    Check,
    CheckKind,
    Culprit,
    Report,
    Result,
    Verdict,
)


def check(**fields: object) -> Check:
    given = dict(name="w", kind="param", shape=(2, 3), verdict="ok")
    return Check(**(given | fields))  # type: ignore[arg-type]


def result(verdict: str = "ok", **fields: object) -> Result:
    return Result(case=fields.pop("case", "linear"), device="cpu", dtype="float64", verdict=verdict, **fields)  # type: ignore[arg-type]


# --- Check ------------------------------------------------------------------------------------


def test_a_check_turns_plain_strings_into_their_members() -> None:
    made = check(kind="node", verdict="mismatch", culprit="manual")
    assert made.kind is CheckKind.NODE and made.verdict is Verdict.MISMATCH and made.culprit is Culprit.MANUAL
    assert made.verdict == "mismatch" and str(made.culprit) == "manual"


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"verdict": "fine"}, id="unknown-verdict"),
        pytest.param({"kind": "weight"}, id="unknown-kind"),
        pytest.param({"culprit": "someone"}, id="unknown-culprit"),
    ],
)
def test_a_check_with_an_unknown_word_fails_when_built(fields: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        check(**fields)


@pytest.mark.parametrize(
    "fields, label",
    [
        pytest.param({}, "w", id="no-index"),
        pytest.param({"index": ()}, "w", id="a-scalar"),
        pytest.param({"index": (1, 2)}, "w[1, 2]", id="an-element"),
        pytest.param({"name": "z", "shape": (3, 2), "index": (1, 1), "complex": True}, "z[1].imag", id="complex-imaginary-part"),
        pytest.param({"name": "z", "shape": (2,), "index": (0,), "complex": True}, "z.real", id="complex-scalar"),
    ],
)
def test_a_checks_label_names_its_worst_element(fields: dict[str, object], label: str) -> None:
    assert check(**fields).label == label


def test_a_complex_checks_dict_says_the_complex_shape_index_and_part() -> None:
    made = check(name="z", shape=(3, 2), index=(2, 0), complex=True).to_dict()
    assert (made["shape"], made["index"], made["part"], made["complex"]) == ([3], [2], "real", True)


def test_a_checks_dict_uses_the_contracts_names() -> None:
    made = check(
        verdict="mismatch", culprit="autograd", index=(0, 1), manual=1.0, numerical=2.0, autograd=3.0, error_bar=1e-9,
        abs_err=1.0, rel_err=0.5, allowed=1e-7, ratio=1e7, rounding=1e-8, bad=2, kinks=1, size=6,
        note="off", coverage={"elements": 6}, compared="manual vs numerical (float64 twins)", reference=4.0, twin=1.5,
    ).to_dict()
    assert made == {
        "name": "w", "kind": "param", "shape": [2, 3], "index": [0, 1], "complex": False, "part": None,
        "verdict": "mismatch", "culprit": "autograd", "manual": 1.0, "numerical": 2.0, "numerical_error": 1e-9,
        "autograd": 3.0, "abs_err": 1.0, "rel_err": 0.5, "tolerance": 1e-7, "tolerance_ratio": 1e7,
        "rounding_allowance": 1e-8, "bad_elements": 2, "kink_elements": 1, "elements": 6, "note": "off",
        "compared": "manual vs numerical (float64 twins)", "twin": 1.5, "coverage": {"elements": 6}, "reference": 4.0,
    }


def test_a_checks_coverage_in_its_dict_is_a_copy() -> None:
    made = check(coverage={"elements": 6})
    made.to_dict()["coverage"]["elements"] = 0  # type: ignore[index]
    assert made.coverage == {"elements": 6}


# --- Result -----------------------------------------------------------------------------------


def test_a_results_id_is_what_pytest_shows() -> None:
    assert result(case="mlp").id == "mlp[cpu-float64]"


def test_a_result_turns_plain_strings_into_members_and_rejects_unknown_ones() -> None:
    made = result("mismatch", culprit="numerical")
    assert made.verdict is Verdict.MISMATCH and made.culprit is Culprit.NUMERICAL
    with pytest.raises(ValueError):
        result("passed")


def test_a_results_dict_holds_every_field_with_its_checks() -> None:
    made = result(
        "mismatch", culprit="manual", message="m", file="cases/a.py", line=3, first_bad_node="h", point="given point",
        seed=None, checks=[check(verdict="mismatch")], hints=["h1"], notes=["n1"], points=4, seconds=0.1234567891,
        order=2, mode="fwd",
    ).to_dict()
    assert made["checks"] == [check(verdict="mismatch").to_dict()]
    assert made["seconds"] == 0.123457
    assert {k: made[k] for k in ("case", "verdict", "culprit", "file", "line", "order", "mode", "points")} == {
        "case": "linear", "verdict": "mismatch", "culprit": "manual", "file": "cases/a.py", "line": 3, "order": 2,
        "mode": "fwd", "points": 4,
    }


def test_a_report_round_trips_through_json_with_non_finite_numbers_as_strings() -> None:
    report = Report(
        [result("mismatch", culprit="manual", checks=[check(verdict="mismatch", ratio=math.inf, rel_err=math.nan, abs_err=-math.inf)])],
        seconds=1.23456,
    )
    loaded = json.loads(json_format.render(report))
    expected = json_format.finite(json.loads(json.dumps(report.to_dict(), default=str, allow_nan=True)))
    assert loaded == expected
    shown = loaded["results"][0]["checks"][0]
    assert (shown["tolerance_ratio"], shown["rel_err"], shown["abs_err"]) == ("inf", "nan", "-inf")
    assert loaded["results"][0]["verdict"] == "mismatch" and loaded["results"][0]["culprit"] == "manual"
    assert loaded["summary"] == {
        "ok": 0, "mismatch": 1, "nondifferentiable": 0, "error": 0, "skipped": 0, "total": 1,
        "exit_code": 1, "seconds": 1.235, "partial": False, "not_checked": None,
    }


def test_a_report_with_a_baseline_says_it_in_its_dict_and_without_one_does_not() -> None:
    assert "baseline" not in Report([result()]).to_dict()
    assert Report([result()], baseline={"file": "b.json"}).to_dict()["baseline"] == {"file": "b.json"}


# --- Report: summary and exit code -------------------------------------------------------------


def test_the_summary_counts_every_verdict_and_the_total() -> None:
    report = Report([result("ok"), result("ok"), result("mismatch"), result("skipped")])
    assert report.summary == {"ok": 2, "mismatch": 1, "nondifferentiable": 0, "error": 0, "skipped": 1, "total": 4}
    assert tuple(report.summary)[:-1] == VERDICTS


@pytest.mark.parametrize(
    "verdicts, code",
    [
        pytest.param(["ok", "nondifferentiable"], EXIT_OK, id="ok-and-kinked-pass"),
        pytest.param(["ok", "mismatch"], EXIT_MISMATCH, id="a-mismatch-fails"),
        pytest.param(["mismatch", "error", "ok"], EXIT_ERROR, id="an-error-wins-over-a-mismatch"),
        pytest.param(["error", "skipped"], EXIT_ERROR, id="an-error-wins-over-nothing-checked"),
        pytest.param(["skipped", "skipped"], EXIT_NOT_CHECKED, id="all-skipped-checks-nothing"),
        pytest.param(["ok", "skipped"], EXIT_OK, id="a-default-device-skipped-passes"),
    ],
)
def test_the_exit_code(verdicts: list[str], code: int) -> None:
    report = Report([result(v, message="no cuda") for v in verdicts])
    assert report.exit_code == code
    assert report.ok is (code == EXIT_OK)


def test_an_interrupted_run_exits_130_whatever_it_found() -> None:
    assert Report([result("error")], partial=True).exit_code == EXIT_INTERRUPTED


def test_a_device_asked_for_by_name_that_is_skipped_fails_the_run() -> None:
    skipped = Result(case="a", device="cuda", dtype="float64", verdict="skipped", message="cuda is not available")
    report = Report([result("ok"), skipped], strict_devices=True)
    assert report.exit_code == EXIT_NOT_CHECKED
    assert report.not_checked == "--device cuda was asked for, but cuda is not available: 1 of 2 results not checked"


@pytest.mark.parametrize(
    "files, reason",
    [
        pytest.param({}, "nothing was checked: no case file was found", id="no-file"),
        pytest.param({"cases/a.py": []}, "nothing was checked: no case is defined in cases/a.py (is @case missing?)", id="no-case"),
        pytest.param(
            {"cases/a.py": ["x", "y"], "cases/b.py": ["z"]},
            "nothing was checked: the selection (-k) matches none of the 3 cases",
            id="nothing-selected",
        ),
    ],
)
def test_an_empty_run_says_why_nothing_was_checked(files: dict[str, list[str]], reason: str) -> None:
    report = Report([], files=files)
    assert report.not_checked == reason
    assert report.exit_code == EXIT_NOT_CHECKED


def test_an_empty_run_that_allows_it_passes() -> None:
    report = Report([], allow_empty=True)
    assert report.not_checked is None and report.exit_code == EXIT_OK


def test_all_results_skipped_say_why_once() -> None:
    report = Report([result("skipped", message="no cuda"), result("skipped", message="no cuda")])
    assert report.not_checked == "nothing was checked: all 2 results were skipped (no cuda)"
