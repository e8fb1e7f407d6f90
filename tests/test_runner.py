"""The run end to end: verdicts, culprits, points, expect, sampled tensors, module cases."""
from __future__ import annotations

import pytest
import torch

from backprop_check import case, node, run
from backprop_check.sources import numerical

CPU64 = dict(devices=["cpu"], dtypes=["float64"])


def linear_case(manual, *, w=1.0, x=1.0, y=2.0, **options):
    @case(params={"w": w}, data={"x": x, "y": y}, **options)
    def linear(w, x, y):
        y_hat = node("y_hat", w * x)
        s = node("s", y_hat - y)
        return s ** 2

    if manual is not None:
        linear.manual(manual)
    return linear


def only(report):
    (result,) = report.results
    return result


def test_the_seeds_linear_example_agrees_three_ways():
    c = linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x}, expect={"loss": 1.0, "w": -2.0})
    result = only(run([c], **CPU64))
    assert result.verdict == "ok"
    assert result.reference == {"loss": 1.0, "gradients": {"w": -2.0}}


@pytest.mark.parametrize(
    "manual",
    [
        pytest.param(lambda w, x, y: {"w": -2 * (w * x - y) * x}, id="sign-flip"),
        pytest.param(lambda w, x, y: {"w": (w * x - y) * x}, id="missing-factor-2"),
        pytest.param(lambda w, x, y: {"w": 2 * (w * x - y)}, id="forgot-x"),
    ],
)
def test_wrong_manual_gradients_blame_manual(manual):
    result = only(run([linear_case(manual)], **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert "manual is the odd one out" in result.message


def test_forgetting_x_looks_right_at_x_equal_1_and_only_random_points_catch_it():
    forgot_x = lambda w, x, y: {"w": 2 * (w * x - y)}  # noqa: E731
    assert only(run([linear_case(forgot_x)], points=0, **CPU64)).verdict == "ok"
    result = only(run([linear_case(forgot_x)], **CPU64))
    assert result.verdict == "mismatch" and "random point" in result.point


class WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t ** 2

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * t  # should be 2·t


def square_case(manual):
    @case(params={"t": [0.5, -1.5, 2.0]})
    def squares(t):
        return WrongBackward.apply(t).sum()

    if manual:
        squares.manual(lambda t: {"t": 2 * t})
    return squares


@pytest.mark.parametrize("manual", [pytest.param(True, id="three-way"), pytest.param(False, id="two-way")])
def test_a_wrong_custom_backward_blames_autograd(manual):
    result = only(run([square_case(manual)], **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert result.checks[0].autograd == pytest.approx(0.5 * result.checks[0].numerical)


def test_manual_and_autograd_agreeing_against_the_reference_blame_numerical():
    class Hidden(torch.autograd.Function):  # the forward lies about its own derivative
        @staticmethod
        def forward(ctx, t):
            return t * 3

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    @case(params={"t": 1.0})
    def liar(t):
        return Hidden.apply(t)

    liar.manual(lambda t: {"t": torch.tensor(2.0, dtype=t.dtype)})
    result = only(run([liar], **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "numerical")


def test_a_manual_gradient_that_accumulates_across_calls_is_caught():
    total = {"w": 0.0}

    def accumulating(w, x, y):
        total["w"] = total["w"] + 2 * (w * x - y) * x
        return dict(total)

    result = only(run([linear_case(accumulating)], **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")


def test_nan_from_the_manual_gradient_alone_blames_manual():
    result = only(run([linear_case(lambda w, x, y: {"w": w * float("nan")})], **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")


def test_a_wrong_published_value_is_a_mismatch_naming_it():
    c = linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x}, expect={"w": -3.0})
    result = only(run([c], **CPU64))
    assert result.verdict == "mismatch"
    assert "expected w = -3" in result.message and "-2" in result.message


def test_a_kink_at_the_given_point_is_nondifferentiable_not_a_mismatch():
    @case(params={"w": [0.0, 2.0]})
    def relu(w):
        return torch.relu(w).sum()

    relu.manual(lambda w: {"w": (w > 0).to(w.dtype)})
    result = only(run([relu], **CPU64))
    assert result.verdict == "nondifferentiable"
    assert "w[0]" in result.message


def test_a_value_outside_the_subgradient_interval_is_still_a_mismatch():
    @case(params={"w": [0.0]}, sample=lambda g: {"w": torch.rand(1, generator=g, dtype=torch.float64) + 0.5})
    def relu(w):
        return torch.relu(w).sum()

    relu.manual(lambda w: {"w": torch.full_like(w, 5.0)})
    result = only(run([relu], **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")


def test_random_points_that_land_on_a_kink_are_redrawn():
    def sometimes_on_the_kink(g):
        on_kink = bool(torch.rand(1, generator=g) < 0.5)
        return {"w": torch.zeros(3, dtype=torch.float64) if on_kink else torch.randn(3, generator=g, dtype=torch.float64)}

    @case(params={"w": [1.0, 2.0, 3.0]}, sample=sometimes_on_the_kink)
    def absolute(w):
        return w.abs().sum()

    absolute.manual(lambda w: {"w": torch.sign(w)})
    result = only(run([absolute], points=6, **CPU64))
    assert result.verdict == "ok", result.message


def test_results_are_repeatable_from_the_seed():
    c = linear_case(lambda w, x, y: {"w": 2 * (w * x - y)})
    first, second = only(run([c], seed=5, **CPU64)), only(run([c], seed=5, **CPU64))
    assert (first.seed, first.checks[0].manual) == (second.seed, second.checks[0].manual)
    assert only(run([c], seed=6, **CPU64)).seed != first.seed


def test_integer_data_stay_integer_and_are_not_redrawn():
    seen = []

    @case(params={"W": [[0.1, 0.2], [0.3, -0.4]]}, data={"X": [[1.0, 2.0]], "labels": [1]})
    def ce(W, X, labels):
        seen.append(labels.clone())
        return torch.nn.functional.cross_entropy(X @ W, labels)

    assert only(run([ce], points=2, **CPU64)).verdict == "ok"
    assert all(s.dtype == torch.int64 and s.tolist() == [1] for s in seen)


def test_cuda_is_skipped_with_its_reason_when_absent():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    report = run([linear_case(None)], devices=["cpu", "cuda"], dtypes=["float64"], allow_skip=True)
    verdicts = {r.device: r for r in report.results}
    assert verdicts["cpu"].verdict == "ok"
    assert verdicts["cuda"].verdict == "skipped" and "CUDA is not available" in verdicts["cuda"].message
    assert report.exit_code == 0
    # Named without allow_skip, the missing device fails the run: it was asked for.
    assert run([linear_case(None)], devices=["cpu", "cuda"], dtypes=["float64"]).exit_code == 5


def test_a_planted_bug_in_a_large_tensor_is_found_and_located_in_the_default_mode():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(60, 50, generator=gen, dtype=torch.float64) / 8
    X = torch.randn(6, 60, generator=gen, dtype=torch.float64)

    def forward(W, X):
        return torch.tanh(X @ W).pow(2).sum()

    def manual(W, X, bug=1.0):
        h = torch.tanh(X @ W)
        g = X.T @ (2 * h * (1 - h * h))
        g[17, 23] *= bug
        return {"W": g}

    good = case(params={"W": W}, data={"X": X}, name="good")(forward)
    good.manual(manual)
    bad = case(params={"W": W}, data={"X": X}, name="bad")(forward)
    bad.manual(lambda W, X: manual(W, X, bug=1.001))
    report = run([good, bad], points=1, **CPU64)
    assert [r.verdict for r in report.results] == ["ok", "mismatch"]
    assert report.results[1].checks[0].label == "W[17, 23]"
    assert f"{numerical.SAMPLES} of 3000 elements estimated numerically, the rest along 2 random directions; manual against autograd at every element" in (report.results[0].checks[0].note or "")


def test_module_cases_check_the_named_parameters():
    @case(module=lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1)),
          data={"X": [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], "Y": [[1.0], [0.0]]})
    def seq(model, X, Y):
        return torch.nn.functional.mse_loss(model(X), Y)

    @case(module=lambda: torch.nn.Linear(1, 1), data={"X": [[1.0], [2.0]], "Y": [[2.0], [4.0]]})
    def lin(model, X, Y):
        return torch.nn.MSELoss()(model(X), Y)

    @lin.manual
    def lin_manual(model, X, Y):
        r = model(X) - Y
        return {"weight": (2 * r / r.numel()).T @ X, "bias": (2 * r / r.numel()).sum(0) * 2}  # bias: ×2 too many

    report = run([seq, lin], **CPU64)
    first, second = report.results
    assert first.verdict == "ok"
    assert {c.name for c in first.checks} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert (second.verdict, second.culprit) == ("mismatch", "manual")
    assert [c.name for c in second.checks if c.verdict == "mismatch"] == ["bias"]


def test_module_parameters_come_from_the_seeded_generator():
    @case(module=lambda: torch.nn.Linear(4, 2), data={"X": [[1.0, 2.0, 3.0, 4.0]]})
    def seeded(model, X):
        return model(X).sum()

    first = only(run([seeded], seed=1, **CPU64)).reference
    again = only(run([seeded], seed=1, **CPU64)).reference
    other = only(run([seeded], seed=2, **CPU64)).reference
    assert first == again and first != other


def test_autograd_on_another_device_is_compared_with_the_cpu(monkeypatch):
    """Simulates a CUDA device whose autograd is off by 1% (a wrong device kernel)."""
    from backprop_check.engine import runner
    from backprop_check.sources import SOURCES

    real_autograd, real_manual = SOURCES["autograd"], SOURCES["manual"]

    def fake_device_autograd(case, point, device, dtype):
        grads = real_autograd(case, point, "cpu", dtype)
        if device == "cuda":
            grads.values = {k: v * 1.01 for k, v in grads.values.items()}
        return grads

    monkeypatch.setitem(SOURCES, "autograd", fake_device_autograd)
    monkeypatch.setitem(SOURCES, "manual", lambda case, point, device, dtype: real_manual(case, point, "cpu", dtype))
    monkeypatch.setattr(runner, "device_unavailable", lambda device: None)
    c = linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x})
    report = run([c], devices=["cpu", "cuda"], dtypes=["float32"], points=1)
    on = {r.device: r for r in report.results}
    assert on["cpu"].verdict == "ok"
    assert (on["cuda"].verdict, on["cuda"].culprit) == ("mismatch", "autograd")
    (device,) = [c for c in on["cuda"].checks if c.kind == "device"]
    assert device.verdict == "mismatch" and device.culprit == "autograd"
    assert "autograd on cuda gives -2.02" in device.note and "on the cpu -2" in device.note
    # The CPU's value is the check's own reference, not passed off as the numerical gradient.
    assert device.reference == pytest.approx(-2.0, rel=1e-3) and device.numerical is None


def test_float32_rounding_near_a_minimum_is_not_blamed_on_anyone():
    """s = 3w − 6 cancels near w = 2: float32 rounding moves the gradient by 1e-3 relative,
    and the tolerance must know it (a fixed rtol of 1e-4 would blame the referee)."""
    near = linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x}, w=2.0001, x=3.0, y=6.0)
    result = only(run([near], devices=["cpu"], dtypes=["float32"], points=0))
    assert result.verdict == "ok", result.message


def test_the_rounding_excuse_never_covers_a_wrong_manual_gradient():
    wrong = linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x * 1.01}, w=2.0001, x=3.0, y=6.0)
    result = only(run([wrong], devices=["cpu"], dtypes=["float32"], points=0))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")


def test_a_wrong_element_is_located_by_blocks_without_checking_every_element():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(80, 60, generator=gen, dtype=torch.float64) / 9
    X = torch.randn(5, 80, generator=gen, dtype=torch.float64)

    @case(params={"W": W}, data={"X": X})
    def block(W, X):
        return torch.tanh(X @ W).pow(2).sum()

    @block.manual
    def block_manual(W, X):
        h = torch.tanh(X @ W)
        g = X.T @ (2 * h * (1 - h * h))
        g[41, 7] *= 1.01
        return {"W": g}

    (result,) = run([block], points=0, **CPU64).results
    (check,) = [c for c in result.checks if c.name == "W"]
    assert (result.verdict, result.culprit, check.label) == ("mismatch", "manual", "W[41, 7]")
    assert check.bad == 1
    checked = int(check.note.split(" of ")[0])
    assert checked < check.size // 10  # the blocks that disagreed, not all 4800 elements


def test_a_float32_run_at_a_point_exact_in_float32_reuses_the_float64_reference(monkeypatch):
    from backprop_check.engine import runner

    computed = []
    original = runner.numerical_for
    monkeypatch.setattr(runner, "numerical_for", lambda case, point, dtype, plan: computed.append((point.label, dtype)) or original(case, point, dtype, plan))
    wrong = linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x * 1.01}, w=1.5, x=3.0, y=6.0)
    report = run([wrong], devices=["cpu"], dtypes=["float64", "float32"], points=2)
    assert [(r.dtype, r.verdict, r.culprit) for r in report.results] == [("float64", "mismatch", "manual"), ("float32", "mismatch", "manual")]
    assert sorted(label for label, _ in computed) == ["given point", "random point 1", "random point 2"]
    assert {dtype for _, dtype in computed} == {torch.float64}


def test_a_float32_run_at_a_point_float32_rounds_gets_its_own_reference(monkeypatch):
    from backprop_check.engine import runner

    computed = []
    original = runner.numerical_for
    monkeypatch.setattr(runner, "numerical_for", lambda case, point, dtype, plan: computed.append((point.label, dtype)) or original(case, point, dtype, plan))
    right = linear_case(lambda w, x, y: {"w": 2 * (w * x - y) * x}, w=0.1, x=3.0, y=6.0)  # 0.1 is not a float32
    report = run([right], devices=["cpu"], dtypes=["float64", "float32"], points=1)
    assert [r.verdict for r in report.results] == ["ok", "ok"]
    assert sorted(computed, key=str) == sorted([("given point", torch.float64), ("given point", torch.float32), ("random point 1", torch.float64)], key=str)
