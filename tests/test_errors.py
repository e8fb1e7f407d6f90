"""Broken cases: each is an `error` with one line naming the file, the case and the reason, and
the run goes on — the other cases of the same file and of other files are still checked."""
from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import torch

import backprop_check.engine.runner
from backprop_check import case, run

CPU64 = dict(devices=["cpu"], dtypes=["float64"], points=1)

HEADER = """\
import torch
from backprop_check import case, node
"""

# A correct case after the broken one in the same file: it must still be checked, and pass.
HEALTHY = """

@case(params={"w": [0.5, -1.0]}, data={"x": [2.0, 3.0]})
def healthy(w, x):
    return ((w * x) ** 2).sum()

@healthy.manual
def healthy_manual(w, x):
    return {"w": 2 * w * x * x}
"""


def write(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def line_of(path: Path, marker: str) -> int:
    """The line of `path` that carries the comment `# <marker>`."""
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if f"# {marker}" in text:
            return number
    raise AssertionError(f"no line marked {marker!r}")


def by_case(report) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for result in report.results:
        grouped.setdefault(result.case, []).append(result)
    return grouped


BROKEN = [
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return (w * x).no_such_method()  # here
        """,
        ["forward raised AttributeError", "no_such_method", "(line {here})"],
        id="forward-raises-with-the-users-line",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            raise SystemExit(3)  # here
        """,
        ["forward raised SystemExit", "(line {here})"],
        id="forward-calls-exit",
    ),
    pytest.param(
        """
        @case(params={"w": [1.0, 2.0, 3.0]}, data={"x": 2.0})
        def broken(w, x):
            return w * x
        """,
        ["the loss must be a scalar", "shape (3,)"],
        id="loss-is-a-vector",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return 3.0
        """,
        ["returned float, not a torch tensor"],
        id="loss-is-a-python-number",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return (w > 0).long().sum()
        """,
        ["the loss must be a float tensor", "int64"],
        id="loss-is-an-integer-tensor",
    ),
    pytest.param(
        """
        @case(params={"w": -1.0}, data={"x": 2.0})
        def broken(w, x):
            return torch.log(w) * x
        """,
        ["the loss is nan at the given point"],
        id="nan-loss-at-the-given-point",
    ),
    pytest.param(
        """
        @case(params={"w": 0.0}, data={"x": 2.0})
        def broken(w, x):
            return x / w
        """,
        ["the loss is inf at the given point"],
        id="inf-loss-at-the-given-point",
    ),
    pytest.param(
        """
        @case(params={"w": 11.0})
        def broken(w):
            return torch.log(w - 10)
        """,
        ["the loss is nan at the random point 1", "constrain random points with sample="],
        id="nan-loss-at-a-random-point-asks-for-sample",
    ),
    pytest.param(
        """
        @case(params={"w": 0.0}, sample=lambda g: {"w": 1 + torch.rand((), generator=g)})
        def broken(w):
            return torch.sqrt(w)
        """,
        ["the numerical gradient of w is nan at the given point", "the edge of its domain"],
        id="gradient-undefined-at-the-given-point",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            if float(w) != 1.0:
                raise ValueError("only w = 1 works")  # here
            return w * x
        """,
        ["forward raised ValueError: only w = 1 works", "(line {here})", "(at the random point 1)"],
        id="forward-raises-only-at-a-random-point",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return w * x

        @broken.manual
        def broken_manual(w, x):
            return {"w": 1 // 0}  # here
        """,
        ["manual gradient raised ZeroDivisionError", "(line {here})"],
        id="manual-raises-with-the-users-line",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0, "v": 2.0}, data={"x": 2.0})
        def broken(w, v, x):
            return w * v * x

        @broken.manual
        def broken_manual(w, v, x):
            return {"w": v * x}
        """,
        ["the manual gradient misses parameter 'v'"],
        id="manual-misses-a-parameter",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return w * x

        @broken.manual
        def broken_manual(w, x):
            return {"w": x, "W": x}
        """,
        ["the manual gradient returns 'W', which is neither a parameter nor a node"],
        id="manual-returns-an-unknown-name",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return w * x

        @broken.manual
        def broken_manual(w, x):
            return x
        """,
        ["the manual gradient must return a dict, got Tensor"],
        id="manual-returns-a-bare-tensor",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return w * x

        @broken.manual
        def broken_manual(w, x):
            return {"w": "two"}
        """,
        ["manual gradient for 'w' is not a number or array"],
        id="manual-returns-a-string",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x, z):
            return w * x * z
        """,
        ["forward argument 'z' is neither a parameter nor a datum"],
        id="forward-argument-nobody-gives",
    ),
    pytest.param(
        """
        @case(data={"x": 2.0})
        def broken(x):
            return x * 2
        """,
        ["the case has no parameters to differentiate"],
        id="no-parameters",
    ),
    pytest.param(
        """
        @case(params={"w": torch.zeros(0)}, data={"x": 2.0})
        def broken(w, x):
            return (w * x).sum()

        @broken.manual
        def broken_manual(w, x):
            return {"w": torch.zeros(0)}
        """,
        ["every parameter is empty", "'w' has shape (0,)", "no gradient to check"],
        id="every-parameter-is-empty",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0, "x": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return w * x
        """,
        ["'x' is given both as a parameter and as a datum"],
        id="a-name-both-parameter-and-datum",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            weights = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
            h = torch.nn.functional.dropout(w * x * weights, 0.5, training=True)
            return h.sum()
        """,
        ["the forward pass is not deterministic", "dropout or unseeded randomness"],
        id="dropout-is-not-deterministic",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            return w * x * torch.rand(())
        """,
        ["the forward pass is not deterministic", "differs between two runs at the same point"],
        id="torch-rand-without-a-generator",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            w.data.mul_(2)
            return w * x
        """,
        ["the forward pass changes 'w' in place"],
        id="forward-scales-its-parameter-in-place",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            x += 1
            return w * x
        """,
        ["the forward pass changes 'x' in place"],
        id="forward-adds-to-its-data-in-place",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0}, sample=lambda g: 42)
        def broken(w, x):
            return w * x
        """,
        ["sample= must return a dict, got int"],
        id="sample-returns-a-number",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0}, sample=lambda g: {"q": 1.0})
        def broken(w, x):
            return w * x
        """,
        ["sample= returns 'q', which is neither a parameter nor a datum"],
        id="sample-returns-an-unknown-name",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0}, sample=lambda g: {"w": [1.0, 2.0]})
        def broken(w, x):
            return w * x
        """,
        ["sample= returns 'w' with shape (2,), but the parameter has shape ()"],
        id="sample-changes-a-parameters-shape",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0}, sample=lambda g: {"w": "abc"})
        def broken(w, x):
            return w * x
        """,
        ["sample= for 'w'", "is not a number, array or tensor", "'abc'"],
        id="sample-returns-a-string",
    ),
    pytest.param(
        """
        def draw(g):
            return {"w": 1 / 0}  # here

        @case(params={"w": 1.0}, data={"x": 2.0}, sample=draw)
        def broken(w, x):
            return w * x
        """,
        ["sample= raised ZeroDivisionError", "(line {here})"],
        id="sample-raises",
    ),
    pytest.param(
        """
        def start(g):
            raise RuntimeError("no initial value")  # here

        @case(params={"w": start}, data={"x": 2.0})
        def broken(w, x):
            return w * x
        """,
        ["the initial value of 'w' raised RuntimeError: no initial value", "(line {here})"],
        id="initial-value-callable-raises",
    ),
    pytest.param(
        """
        @case(params={"w": object()}, data={"x": 2.0})
        def broken(w, x):
            return w * x
        """,
        ["'w' is not a number, array or tensor"],
        id="initial-value-is-not-a-number",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0})
        def broken(w, x):
            a = node("a", w * x)
            return node("a", a * 2)
        """,
        ["node 'a' is marked twice"],
        id="node-marked-twice",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0}, expect={"w": [1.0, 2.0]})
        def broken(w, x):
            return w * x
        """,
        ["expect['w'] has 2 values, the gradient of 'w' has 1"],
        id="expect-of-the-wrong-size",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0}, expect={"w": "two"})
        def broken(w, x):
            return w * x
        """,
        ["expect= for 'w'", "is not a number"],
        id="expect-is-not-a-number",
    ),
    pytest.param(
        """
        @case(params={"w": 1.0}, data={"x": 2.0}, rtol="tight")
        def broken(w, x):
            return w * x
        """,
        ["rtol= and atol= take a number", "'tight'"],
        id="tolerance-is-not-a-number",
    ),
]


@pytest.mark.parametrize(("body", "reasons"), BROKEN)
def test_a_broken_case_is_an_error_naming_file_case_and_reason_and_the_file_goes_on(
    tmp_path, monkeypatch, body, reasons
):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "cases_here.py", textwrap.dedent(body) + HEALTHY)
    here = line_of(path, "here") if "# here" in path.read_text() else None
    report = run(path, devices=["cpu"], dtypes=["float64", "float32"], points=1)

    results = by_case(report)
    assert [r.verdict for r in results["broken"]] == ["error", "error"]
    for result in results["broken"]:
        assert "\n" not in result.message
        assert result.message.startswith("cases_here.py:")
        assert ": broken: " in result.message
        for reason in reasons:
            assert reason.format(here=here) in result.message
    assert [r.verdict for r in results["healthy"]] == ["ok", "ok"]
    assert report.exit_code == 2


def test_a_syntax_error_names_the_file_and_line_and_other_files_still_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a_broken.py", "@case(params={'w': 1.0})\ndef f(w)\n    return w\n")
    write(tmp_path, "b_healthy.py", HEALTHY)
    report = run(tmp_path, **CPU64)

    (error,) = [r for r in report.results if r.verdict == "error"]
    assert error.message == "a_broken.py:4: SyntaxError: expected ':'"
    assert (error.file, error.line, error.case) == ("a_broken.py", 4, "a_broken")
    assert [r.verdict for r in report.results if r.case == "healthy"] == ["ok"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param("import not_a_module_anywhere  # here\n", "ModuleNotFoundError", id="missing-module"),
        pytest.param("x = 1\nraise RuntimeError('setup failed')  # here\n", "RuntimeError: setup failed", id="raise-at-import"),
        pytest.param("import sys\nsys.exit(1)  # here\n", "SystemExit", id="exit-at-import"),
    ],
)
def test_a_file_that_fails_to_import_names_the_file_and_line(tmp_path, monkeypatch, body, reason):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "fails.py", body)
    write(tmp_path, "healthy.py", HEALTHY)
    report = run([path, tmp_path / "healthy.py"], **CPU64)

    error = report.results[0]
    assert error.verdict == "error"
    assert error.message.startswith(f"fails.py:{line_of(path, 'here')}: import failed: ")
    assert reason in error.message
    assert report.results[1].verdict == "ok"


def test_a_missing_file_is_an_error_and_the_other_targets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "healthy.py", HEALTHY)
    report = run(["nowhere.py", "healthy.py"], **CPU64)
    assert [(r.case, r.verdict) for r in report.results] == [("nowhere", "error"), ("healthy", "ok")]
    assert report.results[0].message == "nowhere.py: no such file or folder"


def test_two_cases_with_one_name_in_two_files_is_an_error_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "first.py", HEALTHY)
    write(tmp_path, "second.py", HEALTHY)
    report = run(tmp_path, **CPU64)

    errors = [r for r in report.results if r.verdict == "error"]
    assert len(errors) == 1
    assert errors[0].case == "healthy"
    assert errors[0].message.startswith("second.py:")
    assert "two cases are named 'healthy' (the other is at first.py:" in errors[0].message
    assert [r.verdict for r in report.results if r.verdict != "error"] == ["ok"]


def test_two_case_objects_with_one_name_are_an_error():
    first = case(lambda w: w ** 2, params={"w": 1.0}, name="twin")
    second = case(lambda w: w ** 3, params={"w": 1.0}, name="twin")
    report = run([first, second], **CPU64)
    assert sorted(r.verdict for r in report.results) == ["error", "ok"]
    (error,) = [r for r in report.results if r.verdict == "error"]
    assert "two cases are named 'twin'" in error.message


def test_a_hanging_case_runs_out_of_time_and_the_rest_still_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        "slow.py",
        """
        import time

        @case(params={"w": 1.0})
        def hangs(w):
            for _ in range(2000):  # 20 s at most: a test must fail, not hang, if the limit breaks
                time.sleep(0.01)
        """,
    )
    path.write_text(path.read_text() + HEALTHY)
    run([case(lambda w: w ** 2, params={"w": 1.0}, name="warm_up")], **CPU64)  # lazy imports, untimed
    report = run(path, timeout=2, **CPU64)

    results = by_case(report)
    (hung,) = results["hangs"]
    assert hung.verdict == "error"
    assert hung.message.startswith("slow.py:")
    assert "hangs: the case ran past its time limit of 2s (--timeout)" in hung.message
    assert [r.verdict for r in results["healthy"]] == ["ok"]


def test_the_time_limit_does_not_outlive_the_case():
    quick = case(lambda w: w ** 2, params={"w": 1.0}, name="quick")
    report = run([quick], timeout=0.2, **CPU64)
    assert report.results[0].verdict == "ok"
    time.sleep(0.4)  # an alarm left armed would raise CaseTimeout here and fail the test


def test_an_internal_error_on_one_case_is_an_error_and_the_others_still_run(monkeypatch):
    real = backprop_check.engine.runner.compare

    def flaky(evidence):
        if "boom" in evidence.params:
            raise RuntimeError("a bug in the harness")
        return real(evidence)

    monkeypatch.setattr(backprop_check.engine.runner, "compare", flaky)
    unlucky = case(lambda boom: boom ** 2, params={"boom": 1.0}, name="unlucky")
    fine = case(lambda w: w ** 2, params={"w": 1.0}, name="fine")
    report = run([unlucky, fine], **CPU64)

    assert [(r.case, r.verdict) for r in report.results] == [("unlucky", "error"), ("fine", "ok")]
    assert "internal error of backprop_check: RuntimeError: a bug in the harness" in report.results[0].message
    assert "a bug in the harness" in report.results[0].traceback


def test_an_error_keeps_the_traceback_for_those_who_ask(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        "raises.py",
        """
        @case(params={"w": 1.0})
        def raises(w):
            return w.no_such_method()
        """,
    )
    (result,) = run(path, **CPU64).results
    assert "Traceback" not in result.message
    assert "no_such_method" in result.traceback and "raises.py" in result.traceback


# The manual gradient's own failures are mismatches that blame it, not errors.


def vector_case(manual, **options):
    @case(params={"w": [1.0, -2.0, 0.5]}, data={"x": [3.0, -1.0, 2.0]}, **options)
    def weighted(w, x):
        return (w * w * x).sum()

    weighted.manual(manual)
    return weighted


def with_element(value):
    def manual(w, x):
        grad = 2 * w * x
        grad[1] = value
        return {"w": grad}

    return manual


@pytest.mark.parametrize(
    "value", [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf")]
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_non_finite_manual_element_blames_manual_and_names_the_element(value, dtype):
    report = run([vector_case(with_element(value))], devices=["cpu"], dtypes=[dtype], points=1)
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert f"dloss/dw[1]: manual {value}" in result.message
    assert result.checks[0].index == (1,)


def test_a_manual_gradient_accumulating_across_calls_blames_manual():
    buffer: dict[str, torch.Tensor] = {}

    def accumulating(w, x):
        buffer.setdefault("w", torch.zeros_like(w))
        buffer["w"] += 2 * w * x  # the bug: += into a buffer that outlives the call
        return {"w": buffer["w"].clone()}

    report = run([vector_case(accumulating)], devices=["cpu"], dtypes=["float64", "float32"], points=2)
    assert [(r.verdict, r.culprit) for r in report.results] == [("mismatch", "manual")] * 2
    # The first call is right; from the second call on, every point disagrees.
    assert "2 of 3 points disagree" in report.results[0].message
    assert "3 of 3 points disagree" in report.results[1].message


def test_nan_from_autograd_alone_blames_autograd():
    # The `where` trick: the unused sqrt branch is NaN for w < 0 and its NaN gradient leaks.
    @case(params={"w": -1.0}, sample=lambda g: {"w": -0.5 - torch.rand((), generator=g)})
    def leaky_where(w):
        return torch.where(w < 0, w, torch.sqrt(w))

    @leaky_where.manual
    def leaky_where_manual(w):
        return {"w": 1.0}

    (result,) = run([leaky_where], **CPU64).results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "autograd nan" in result.message


def test_an_empty_parameter_beside_others_is_checked_and_noted_not_silently_passed():
    # An empty tensor has no gradient elements: nothing can be wrong there, and nothing is
    # claimed. The other parameters are checked as usual, and the result says what was empty.
    @case(params={"w": torch.zeros(0), "v": [1.0, 2.0]}, data={"x": 3.0})
    def partly_empty(w, v, x):
        return (w * x).sum() + (v ** 2).sum() * x

    @partly_empty.manual
    def partly_empty_manual(w, v, x):
        return {"w": torch.zeros(0), "v": 2 * v * x}

    (result,) = run([partly_empty], **CPU64).results
    assert result.verdict == "ok"
    assert "parameter 'w' has shape (0,): it has no elements to check" in result.notes
    checked = {check.name: check.size for check in result.checks}
    assert checked == {"w": 0, "v": 2}


def test_an_empty_parameter_still_catches_a_bug_in_the_others():
    @case(params={"w": torch.zeros(0), "v": [1.0, 2.0]}, data={"x": 3.0})
    def partly_empty(w, v, x):
        return (w * x).sum() + (v ** 2).sum() * x

    @partly_empty.manual
    def partly_empty_manual(w, v, x):
        return {"w": torch.zeros(0), "v": 2 * v}  # forgot x

    (result,) = run([partly_empty], **CPU64).results
    assert (result.verdict, result.culprit) == ("mismatch", "manual")


def test_a_function_whose_output_is_infinite_is_said_so_not_by_the_sign_of_its_loss():
    # soft_margin_loss overflows exp(1000) to +inf; the loss (the output summed against a random
    # grad_output) was -inf, and the message said "the loss is -inf".
    import backprop_check

    x = torch.full((4,), 1000.0, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    (result,) = backprop_check.check(
        lambda x, y: torch.nn.functional.soft_margin_loss(x, y), {"x": x, "y": y}, dtypes=["float64"], points=0
    ).results
    assert str(result.verdict) == "error" and "fn's outputs are not finite" in result.message, result.message


def test_a_random_point_whose_outputs_are_not_finite_does_not_name_the_cotangents():
    # sample= returns x; the cotangents (grad_output0) are drawn as always, and never make fn's
    # outputs NaN: the hint said "sample= leaves out 'grad_output0' … return it from sample= too".
    def fn(x):
        var = (x * x).mean(0) - x.mean(0) ** 2  # E[x²] − mean²: NaN at x ≈ 1e4 in float32
        return (x - x.mean(0)) / var.sqrt()

    x = torch.ones(6, 3, dtype=torch.float64) + torch.arange(18, dtype=torch.float64).reshape(6, 3) / 17
    report = backprop_check.check(
        fn, {"x": x.requires_grad_()}, points=1, dtypes=["float32"],
        sample=lambda g: {"x": torch.randn(6, 3, generator=g, dtype=torch.float64) + 1e4},
    )
    (result,) = report.results
    assert result.verdict == "error" and "not finite at the random point" in result.message, result.message
    assert "grad_output" not in result.message.split("grad_outputs is")[-1], result.message
    assert "outside the loss's domain" in result.message


class _SoftmaxInPlace(torch.autograd.Function):
    """Megatron's cross-entropy pattern: logits.float() then exp_ and div_ on it, a copy in
    float64 and the caller's own tensor in float32."""

    @staticmethod
    def forward(ctx, logits):
        ctx.dtype = logits.dtype
        p = logits.float()
        p.sub_(p.max(-1, keepdim=True).values).exp_()
        p.div_(p.sum(-1, keepdim=True))
        ctx.save_for_backward(p)
        return p[..., 0]

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        grad = -p * p[..., :1]
        grad[..., 0] += p[..., 0]
        return (grad * g[..., None]).to(ctx.dtype)


def test_a_forward_that_edits_its_input_only_in_float32_is_said_so():
    # The float64 purity check runs on a copy fn makes; in float32 `.float()` is the input
    # itself, and the contract said only "modified by an inplace operation … version 6".
    def fn(logits):
        return _SoftmaxInPlace.apply(logits)

    x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    report = backprop_check.check(fn, {"logits": x.clone().requires_grad_()}, dtypes=["float64", "float32"], points=0)
    f64, f32 = report.results
    assert f64.verdict == "ok", f64.message
    assert f32.verdict == "error" and "changes 'logits' in place in float32" in f32.message, f32.message


def test_data_holding_nan_is_not_taken_for_an_input_the_forward_changed():
    # Missing values as NaN: NaN is not equal to itself, and the purity check read the unchanged
    # data as "the forward pass changes 'x' in place".
    def fn(w, x):
        return (w * torch.nan_to_num(x)).sum()

    x = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    report = backprop_check.check(fn, {"w": w, "x": x}, dtypes=["float64", "float32"], points=0)
    assert [str(r.verdict) for r in report.results] == ["ok", "ok"], [r.message for r in report.results]
