"""numpy cases (`@case(..., numpy=True)`): the tutorial's code as it was written, what the user's
code receives, nodes, kinks, sampled tensors, the in-place numerical loop, bad input in one
line, CPU only with one note, baselines, trace, every report format and the pytest plugin."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from backprop_check import case, node, run
from backprop_check.model.arrays import NUMPY_NOTE
from backprop_check.commands.cli import main
from backprop_check.model.forward import call_forward
from backprop_check.model.points import given_point, random_point
from backprop_check.sources import numerical, stencil
from backprop_check.sources.inplace import InPlace
from backprop_check.sources.batches import Batched, Flat, evaluate

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CPU64 = dict(devices=["cpu"], dtypes=["float64"])


def by_case(report):
    return {(r.case, r.dtype): r for r in report.results}


def mse_case(gradient, **options):
    @case(params={"w": 0.0}, data={"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]}, numpy=True, **options)
    def mse(w, X, Y):
        y_pred = node("y_pred", w * X)
        s = node("s", y_pred - Y)
        return (s**2).mean()

    mse.manual(gradient)
    return mse


def test_the_tutorials_numpy_code_pasted_as_it_is_blames_manual_by_a_factor_of_n():
    report = run(EXAMPLES / "numpy_tutorial.py", devices=["cpu", "cuda"])
    results = by_case(report)
    assert set(results) == {(name, dtype) for name in ("tutorial", "tutorial_fixed") for dtype in ("float64", "float32")}
    assert all(r.device == "cpu" for r in report.results)  # a numpy case is a CPU case: no cuda result
    for dtype in ("float64", "float32"):
        bad = results[("tutorial", dtype)]
        assert (bad.verdict, bad.culprit) == ("mismatch", "manual")
        assert "manual -120, numerical -30" in bad.message
        assert any("4× the true gradient, with N = 4 = X.shape[0]: the 1/N of a mean" in h for h in bad.hints)
        assert results[("tutorial_fixed", dtype)].verdict == "ok"
    assert report.exit_code == 1


def test_autograd_is_said_to_be_absent_once_per_result_and_once_in_the_text_report(capsys):
    report = run([mse_case(lambda w, X, Y: {"w": np.dot(2 * X, w * X - Y).mean()})], devices=["cpu"])
    assert all(r.numpy and NUMPY_NOTE not in r.notes for r in report.results)  # said once by the reports
    assert all(c.autograd is None for r in report.results for c in r.checks)
    main(["run", str(EXAMPLES / "numpy_tutorial.py"), "--points", "0"])
    out = capsys.readouterr().out
    assert out.count("autograd does not apply to a numpy forward") == 1
    assert "note: tutorial, tutorial_fixed: autograd does not apply" in out


def test_a_numpy_case_asked_for_cuda_only_is_skipped_with_the_reason():
    report = run([mse_case(lambda w, X, Y: {"w": (2 * X * (w * X - Y)).mean()})], devices=["cuda"], dtypes=["float64"])
    (result,) = report.results
    assert result.verdict == "skipped" and "runs on the CPU only" in result.message


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_forward_and_manual_receive_numpy_arrays_in_the_runs_dtype_and_labels_stay_integer(dtype):
    seen = []

    @case(params={"w": [0.5, -1.0]}, data={"x": [1.0, 2.0], "label": [0, 1]}, numpy=True)
    def labelled(w, x, label):
        seen.append((type(w), w.dtype, x.dtype, label.dtype))
        return float(np.sum(w * x * (label + 1)))

    labelled.manual(lambda w, x, label: {"w": x * (label + 1)})
    (result,) = run([labelled], devices=["cpu"], dtypes=[dtype]).results
    assert result.verdict == "ok"
    assert (np.ndarray, np.dtype(dtype), np.dtype(dtype), np.dtype("int64")) in seen
    assert all(kind is np.ndarray and label == np.dtype("int64") for kind, _, _, label in seen)


def test_a_wrong_node_gradient_is_the_first_bad_node_in_a_numpy_case():
    def manual(w, X, Y):
        s = w * X - Y
        dloss_ds = 2 * s  # the 1/N of the mean forgotten here, and carried on
        return {"w": np.dot(dloss_ds, X), "y_pred": dloss_ds, "s": dloss_ds}

    result = by_case(run([mse_case(manual)], **CPU64))[("mse", "float64")]
    assert (result.verdict, result.culprit, result.first_bad_node) == ("mismatch", "manual", "s")
    assert "the derivation first goes wrong at node 's'" in result.message


def test_a_random_point_catches_a_factor_that_is_one_at_the_given_point():
    @case(params={"w": 1.0}, data={"x": 1.0, "y": 2.0}, numpy=True)
    def linear(w, x, y):
        return (w * x - y) ** 2

    linear.manual(lambda w, x, y: {"w": 2 * (w * x - y)})  # dŷ/dw = x forgotten
    assert run([linear], points=0, **CPU64).results[0].verdict == "ok"
    result = run([linear], **CPU64).results[0]
    assert result.verdict == "mismatch" and "random point" in result.point


@pytest.mark.parametrize("slip", [None, "s * (1 + s)"], ids=["correct", "slipped"])
def test_float32_numpy_code_is_allowed_its_own_rounding_and_a_slip_still_fails(slip):
    # Raw pixels: float32's sigmoid is exactly 1 from x ≈ 17, and s·(1 − s) is 0 there (the truth
    # 3e-10). The float64 twin of this very code moves by 6e-8 when s moves by float32's rounding:
    # simulated through the arrays numpy code is given, as torch code's through its ops (a false
    # alarm blaming the manual gradient before). The same slip in the twin still fails.
    x = np.array([[113.0, 40.0, 138.0, 150.0], [62.0, 210.0, 73.0, 76.0], [22.0, 175.0, 165.0, 118.0]])

    @case(params={"x": x}, numpy=True)
    def sigmoid(x):
        return (1 / (1 + np.exp(-x))).sum()

    sigmoid.manual(lambda x: {"x": eval(slip or "s * (1 - s)", {"s": 1 / (1 + np.exp(-x))})})
    result = by_case(run([sigmoid], devices=["cpu"], dtypes=["float32"]))[("sigmoid", "float32")]
    if slip is None:
        assert result.verdict == "ok", result.message
        assert any("moved within float32's rounding" in note for note in result.notes), result.notes
    else:
        assert (result.verdict, result.culprit) == ("mismatch", "manual"), result.message


def test_the_simulated_rounding_reaches_numpy_ufuncs_and_reductions_and_nothing_outside_it():
    from backprop_check.model.arrays import Jittered, as_array

    def compute():
        a = as_array("a", torch.full((4,), 1.0, dtype=torch.float64))
        return np.exp(a).sum(), a @ a, np.mean(a * 3.0)

    plain = compute()
    with Jittered(2.0**-24, seed=0):
        up = compute()
    with Jittered(-(2.0**-24), seed=0):
        down = compute()
    assert compute() == plain  # nothing left moving once the draws are done
    for p, u, d in zip(plain, up, down):
        assert u != p and abs(u - p) < 1e-6 * abs(p) and (u - p) * (d - p) < 0  # moved, a rounding's share, opposite
    assert type(as_array("a", torch.ones(2))) is np.ndarray


def test_a_kink_at_the_given_point_is_nondifferentiable_not_a_mismatch():
    @case(params={"w": [0.0, 1.5]}, numpy=True, sample=lambda gen: {"w": torch.rand(2, generator=gen, dtype=torch.float64) + 0.5})
    def l1(w):
        return np.abs(w).sum()

    l1.manual(lambda w: {"w": np.sign(w)})
    result = run([l1], **CPU64).results[0]
    assert result.verdict == "nondifferentiable" and "w[0]" in result.message


def test_a_large_numpy_tensor_is_sampled_and_a_planted_wrong_element_is_named():
    @case(params={"w": lambda gen: torch.randn(3000, generator=gen, dtype=torch.float64)}, numpy=True)
    def squares(w):
        return 0.5 * np.dot(w, w)

    def manual(w):
        g = w.copy()
        g[1234] += 0.5
        return {"w": g}

    squares.manual(manual)
    result = run([squares], points=0, **CPU64).results[0]
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert "dloss/dw[1234]" in result.message


def test_the_in_place_loop_gives_the_generic_loops_values_bit_for_bit():
    c = mse_case(lambda w, X, Y: {"w": 0.0})
    point = random_point(c, given_point(c, 0), 1, 0)
    problem = numerical.FiniteDifferences(c, point, torch.float64)
    assert isinstance(problem.batched, InPlace)

    def loss(values):  # the generic loop's loss: tensor rows in, one forward call per row
        params, offsets = {k: values[k] for k in point.params}, {k: values[k] for k in problem.nodes}
        return call_forward(c, replace(point, params=params), offsets)[0].to(torch.float64)

    generic = Batched(loss)
    assert set(problem.targets) == {"w", "y_pred", "s"}
    for name in problem.targets:
        flat = Flat({name: problem.targets[name]})
        h, index = stencil.steps_for(flat.join(problem.scales)), torch.arange(flat.size)
        fast = evaluate(problem.batched, problem.targets, flat, h, index)
        slow = evaluate(generic, problem.targets, flat, h, index)
        assert torch.equal(fast, slow), name
    assert generic.note is not None  # the generic loop could not vmap numpy; the fast one never tries


def test_the_in_place_loop_leaves_the_point_as_it_was():
    c = mse_case(lambda w, X, Y: {"w": 0.0})
    point = given_point(c, 0)
    before = {k: v.clone() for k, v in point.params.items()}
    numerical.gradient(c, point, "cpu", torch.float64)
    assert all(torch.equal(before[k], point.params[k]) for k in before)


@pytest.mark.parametrize(
    "forward, manual, says",
    [
        pytest.param(lambda w, x: (w * x - 1) ** 2, lambda w, x: {"w": 2 * (w * x - 1) * x},
                     "the forward returned an array of shape (3,), not a number", id="loss-is-an-array"),
        pytest.param(lambda w, x: torch.tensor(1.0), lambda w, x: {"w": x},
                     "the forward of a numpy=True case returned a torch tensor", id="forward-returns-a-tensor"),
        pytest.param(lambda w, x: float((w * x).sum()), lambda w, x: {"w": torch.as_tensor(x)},
                     "the manual gradient of a numpy=True case returns a torch tensor for 'w'", id="manual-returns-a-tensor"),
        pytest.param(lambda w, x: float(node("h", torch.as_tensor(w * x)).sum()), lambda w, x: {"w": x},
                     "node 'h' is a torch tensor in a numpy=True case", id="node-is-a-tensor"),
        pytest.param(lambda w, x: float((w * x).sum()), None,
                     "a numpy=True case needs a .manual gradient", id="no-manual"),
    ],
)
def test_bad_input_in_a_numpy_case_is_one_line_and_the_other_cases_still_run(forward, manual, says):
    broken = case(forward, params={"w": [1.0, 2.0, 3.0]}, data={"x": [1.0, 1.0, 2.0]}, numpy=True, name="broken")
    if manual is not None:
        broken.manual(manual)
    fine = mse_case(lambda w, X, Y: {"w": (2 * X * (w * X - Y)).mean()})
    results = by_case(run([broken, fine], **CPU64))
    bad = results[("broken", "float64")]
    assert bad.verdict == "error" and says in bad.message and "\n" not in bad.message
    assert results[("mse", "float64")].verdict == "ok"


def test_a_torch_tensor_given_to_a_numpy_case_is_one_line():
    c = case(lambda w: float((w**2).sum()), params={"w": torch.ones(2)}, numpy=True, name="tensor_param")
    c.manual(lambda w: {"w": 2 * w})
    (result,) = run([c], **CPU64).results
    assert result.verdict == "error" and "parameter 'w' is a torch tensor, but the case is numpy=True" in result.message


def test_a_torch_case_whose_forward_returns_numpy_says_to_use_numpy_true():
    c = case(lambda w: np.sum(w.numpy() ** 2), params={"w": [1.0, 2.0]}, name="numpy_in_torch")
    results = run([c], devices=["cpu"]).results
    assert all(r.verdict == "error" and "use @case(..., numpy=True)" in r.message for r in results)


def test_a_numpy_case_keeps_its_manual_gradient_in_a_baseline_and_a_drift_blames_manual(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = (EXAMPLES / "numpy_tutorial.py").read_text()
    (tmp_path / "tut.py").write_text(source)
    options = ["run", "tut.py", "-k", "tutorial_fixed", "--points", "0", "--dtype", "float64", "--format", "json", "--baseline", "b.json"]
    assert main([*options, "--update-baseline"]) == 0
    stored = json.loads((tmp_path / "b.json").read_text())["cases"]["tutorial_fixed[cpu-float64]"]
    assert stored == {"loss": 30.0, "gradients": {"w": -30.0}, "file": "tut.py"}
    (tmp_path / "tut.py").write_text(source.replace("dJ_dw = np.dot(dJ_dy_pred, dy_pred_dw)", "dJ_dw = np.dot(dJ_dy_pred, dy_pred_dw) * (1 + 1e-9)"))
    capsys.readouterr()
    assert main(options) == 1
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert (result["verdict"], result["culprit"]) == ("mismatch", "manual")
    assert "the manual and numerical gradients still agree with each other" in result["message"]


def test_trace_replays_a_numpy_case_stepping_with_its_manual_gradient(capsys):
    code = main(["trace", str(EXAMPLES / "numpy_tutorial.py"), "-k", "tutorial_fixed", "--epochs", "2", "--lr", "0.01"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[1:3] == ["\tgrad: -30.0", "progress: 0 30.0"]
    code = main(["trace", str(EXAMPLES / "numpy_tutorial.py"), "-k", "tutorial", "--epochs", "2", "--lr", "0.01"])
    assert code == 1 and "stopped at step 1 (epoch 0): the manual gradient is the odd one out" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["json", "junit", "markdown"])
def test_every_report_format_renders_a_numpy_case(form, tmp_path, capsys):
    output = tmp_path / f"report.{form}"
    code = main(["run", str(EXAMPLES / "numpy_tutorial.py"), "--points", "0", "--format", form, "--output", str(output)])
    text = output.read_text()
    assert code == 1 and "tutorial" in text
    if form == "json":
        results = json.loads(text)["results"]
        assert {r["device"] for r in results} == {"cpu"}
        assert all(c["autograd"] is None for r in results for c in r["checks"])
    if form == "markdown":
        assert "autograd does not apply to a numpy forward" in text


def test_the_pytest_plugin_collects_numpy_cases_on_the_cpu_only(pytester: pytest.Pytester):
    pytester.makepyfile(**{"cases/tut": (EXAMPLES / "numpy_tutorial.py").read_text()})
    result = pytester.runpytest("cases", "--bc-points", "0", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*tutorial[[]cpu-float64[]]*", "*manual is the odd one out*"])
    assert "collected 4 items" in result.stdout.str()  # two cases × two dtypes, no cuda items


def _pool_forward(x):
    n, c, h, w = x.shape
    out = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    return out, (x, out)


def _pool_backward_to_every_tie(dout, cache):
    x, out = cache
    n, c, h, w = x.shape
    mask = x.reshape(n, c, h // 2, 2, w // 2, 2) == out[:, :, :, None, :, None]
    return (mask * dout[:, :, :, None, :, None]).reshape(x.shape)


def _pool_backward_to_one(dout, cache):
    x, out = cache
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    first = np.eye(4)[windows.argmax(axis=-1)] * dout[..., None]
    return first.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)


@pytest.mark.parametrize("shape, seed", [((2, 2, 4, 4), 11), ((2, 3, 8, 8), 0), ((1, 2, 16, 16), 0)])
def test_a_pool_that_routes_the_gradient_to_every_tied_maximum_fails_at_any_size(shape, seed):
    # Integer pixels tie in a window; a sample of a large tensor seldom holds the tie, and a random
    # direction passes it where it moves the tied pixels apart (the 8×8 image passed before).
    from backprop_check import check_layer

    x = np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float64)
    windows = x.reshape(*shape[:2], shape[2] // 2, 2, shape[3] // 2, 2)
    assert ((windows == windows.max(axis=(3, 5), keepdims=True)).sum(axis=(3, 5)) > 1).any()  # a tie to find
    wrong = check_layer(_pool_forward, _pool_backward_to_every_tie, (x,), dtypes=["float64"], points=0).results[0]
    assert (wrong.verdict, wrong.culprit) == ("mismatch", "manual"), wrong.message
    assert "moved together" in wrong.message
    right = check_layer(_pool_forward, _pool_backward_to_one, (x,), dtypes=["float64"], points=0).results[0]
    assert right.verdict in ("ok", "nondifferentiable"), right.message
