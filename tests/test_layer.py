"""Layer pairs (`check_layer`, `layer`): the course's forward/backward pairs in numpy and torch,
a random dout redrawn at every point, wrong and missing gradients named by their input, a
cache changed by backward, and layers in case files collected by the CLI and pytest."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from backprop_check import check_layer, layer, run
from backprop_check.commands.cli import main

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CPU64 = dict(devices=["cpu"], dtypes=["float64"])


def examples():
    spec = importlib.util.spec_from_file_location("layers_example", EXAMPLES / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


L = examples()
rng = np.random.default_rng(7)
X, W, B = rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)


def only(report):
    (result,) = report.results
    return result


def test_the_example_layers_agree_in_both_dtypes_on_the_cpu_only():
    report = run(EXAMPLES / "layers.py", devices=["cpu", "cuda"])
    assert {(r.case, r.device, r.dtype, r.verdict) for r in report.results} == {
        (name, "cpu", dtype, "ok") for name in ("affine", "batchnorm") for dtype in ("float64", "float32")
    }


def test_a_course_layer_with_a_conv_param_dict_is_checked_with_the_dict_passed_through():
    def scale_forward(x, w, param):
        out = x * w * param["gain"]
        return out, (x, w, param)

    def scale_backward(dout, cache):
        x, w, param = cache
        return dout * w * param["gain"], (dout * x * param["gain"]).sum(axis=0), None  # None for the dict

    result = only(check_layer(scale_forward, scale_backward, (X, rng.standard_normal(5), {"gain": 3.0}), **CPU64))
    assert result.verdict == "ok" and result.case == "scale"


def test_a_wrong_bias_gradient_is_named_with_its_factor():
    def backward(dout, cache):
        dx, dw, db = L.affine_backward(dout, cache)
        return dx, dw, db / dout.shape[0]  # averaged where the batch shares b: a sum

    result = only(check_layer(L.affine_forward, backward, (X, W, B), **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert "dloss/db[" in result.message
    assert any("1/4 of the true gradient" in hint for hint in result.hints)


def test_batchnorm_without_the_variances_path_back_to_x_is_caught():
    def backward(dout, cache):
        xc, std, x_hat, gamma = cache
        dx_hat = dout * gamma
        dxc = dx_hat / std  # the path through var (and std) is forgotten
        return dxc - dxc.mean(axis=0), (dout * x_hat).sum(axis=0), dout.sum(axis=0)

    inputs = (rng.standard_normal((6, 4)), rng.standard_normal(4), rng.standard_normal(4), {"mode": "train"})
    result = only(check_layer(L.batchnorm_forward, backward, inputs, **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual") and "dloss/dx[" in result.message
    assert [c.name for c in result.checks if c.verdict == "mismatch"] == ["x"]  # gamma and beta are right


def test_dout_is_random_at_the_given_point_and_redrawn_at_every_point():
    seen = []

    def backward(dout, cache):
        seen.append(dout.copy())
        return L.affine_backward(dout, cache)

    assert only(check_layer(L.affine_forward, backward, (X, W, B), points=2, **CPU64)).verdict == "ok"
    distinct = {d.tobytes() for d in seen}
    assert len(distinct) >= 3  # the given point and two random points
    assert not any(np.all(d == 1.0) for d in seen) and all(d.shape == (4, 3) for d in seen)


@pytest.mark.parametrize(
    "backward, says",
    [
        pytest.param(lambda dout, cache: L.affine_backward(dout, cache)[:2],
                     "backward returned 2 gradients for 3 inputs (x, w, b): the gradient of 'b' is missing", id="missing-db"),
        pytest.param(lambda dout, cache: L.affine_backward(dout, cache)[0],
                     "backward returned one ndarray, but the layer has 3 inputs to differentiate (x, w, b)", id="bare-array"),
        pytest.param(lambda dout, cache: (*L.affine_backward(dout, cache), dout),
                     "backward returned 4 gradients, but the layer has 3 inputs to differentiate (x, w, b): 1 too many", id="one-too-many"),
        pytest.param(lambda dout, cache: (L.affine_backward(dout, cache)[0], None, dout.sum(axis=0)),
                     "backward returned None as the gradient of 'w'", id="none-for-w"),
        pytest.param(lambda dout, cache: L.affine_backward(dout, (cache[0].__imul__(2) / 2, cache[1])),
                     "backward changes cache[0] (an array of shape (4, 5)) in place", id="cache-changed"),
        pytest.param(lambda dout, cache: torch.zeros(3),
                     "backward returned one Tensor, but the layer has 3 inputs", id="torch-in-numpy-layer"),
    ],
)
def test_a_broken_backward_is_one_line_naming_the_input(backward, says):
    result = only(check_layer(L.affine_forward, backward, (X, W, B), **CPU64))
    assert result.verdict == "error" and says in result.message and "\n" not in result.message


def test_a_bias_gradient_summed_over_the_wrong_axis_is_a_slip_of_the_backward():
    result = only(check_layer(L.affine_forward, lambda dout, cache: (*L.affine_backward(dout, cache)[:2], dout.sum(axis=1)), (X, W, B), **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual"), result.message
    assert "b: manual gradient has shape (4,), expected (3,)" in result.message and "wrong axis" in result.message


def test_a_forward_that_clips_its_input_in_place_is_an_error_and_leaves_the_callers_array():
    def relu_forward(x):
        out = x  # no copy: the caller's x would be clipped, and the given point with it
        out[out < 0] = 0
        return out, x

    x = rng.standard_normal((4, 5))
    given = x.copy()
    result = only(check_layer(relu_forward, lambda dout, x: dout * (x > 0), (x,), **CPU64))
    assert result.verdict == "error" and "the forward changes 'x' in place" in result.message, result.message
    assert np.array_equal(x, given)


def test_a_torch_gradient_from_a_numpy_backward_is_one_line():
    result = only(check_layer(lambda x: (2 * x, x), lambda dout, x: torch.as_tensor(2 * dout), X, **CPU64))
    assert result.verdict == "error" and "returns a torch tensor for 'x'" in result.message


def test_a_transposed_weight_gradient_is_a_mismatch_with_the_transpose_hint():
    def backward(dout, cache):
        dx, dw, db = L.affine_backward(dout, cache)
        return dx, dw.T, db

    result = only(check_layer(L.affine_forward, backward, (X, W, B), **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert "w: manual gradient has shape (3, 5), the transpose of (5, 3); transposed, it matches" in result.message
    assert any("multiply the chain for the manual dloss/dw in the other order" in hint for hint in result.hints)


@pytest.mark.parametrize(
    "forward, inputs, says",
    [
        pytest.param(lambda x: 2 * x, (X,), "a layer's forward must return (out, cache), got ndarray", id="no-cache"),
        pytest.param(lambda x, w: ((x * w), x), (X, torch.ones(4, 5)), "input 'w' is a torch tensor and others are numpy arrays", id="mixed"),
        pytest.param(lambda x: (x, x), ({"a": 1},), "no float input to differentiate", id="nothing-to-differentiate"),
        pytest.param(lambda x: (torch.as_tensor(x), x), (X,), "forward's out is a torch tensor in a numpy layer", id="torch-out"),
        pytest.param(lambda x: (x[9], x), (X,), "forward raised IndexError", id="forward-raises"),
    ],
)
def test_a_broken_forward_is_one_line(forward, inputs, says):
    result = only(check_layer(forward, lambda dout, cache: dout, inputs, **CPU64))
    assert result.verdict == "error" and says in result.message


def test_a_single_input_layer_takes_a_bare_gradient_and_relu_passes_while_a_leaky_copy_fails():
    def relu_forward(x):
        return np.maximum(0, x), x

    def relu_backward(dout, cache):
        return dout * (cache > 0)

    def relu_backward_leaky(dout, cache):
        return dout * np.where(cache > 0, 1.0, 0.01)  # the forward is not leaky

    x = rng.standard_normal((3, 4))
    assert only(check_layer(relu_forward, relu_backward, x, **CPU64)).verdict == "ok"
    result = only(check_layer(relu_forward, relu_backward_leaky, x, **CPU64))
    assert (result.verdict, result.culprit, result.case) == ("mismatch", "manual", "relu")


def test_a_torch_layer_is_checked_three_ways_and_a_wrong_backward_blames_manual():
    def matmul_forward(x, w):
        return x @ w, (x, w)

    def matmul_backward(dout, cache):
        x, w = cache
        return dout @ w.T, x.T @ dout

    def matmul_backward_wrong(dout, cache):
        x, w = cache
        return dout @ w.T, x.T @ dout * 2

    inputs = (torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    good = check_layer(matmul_forward, matmul_backward, inputs, devices=["cpu"])
    assert [r.verdict for r in good.results] == ["ok", "ok"]
    assert all(c.autograd is not None for r in good.results for c in r.checks)
    bad = only(check_layer(matmul_forward, matmul_backward_wrong, inputs, **CPU64))
    assert (bad.verdict, bad.culprit) == ("mismatch", "manual") and "dloss/dw[" in bad.message


LAYER_FILE = '''
import numpy as np
from backprop_check import layer


def double_forward(x):
    return 2 * x, None


def double_backward(dout, cache):
    return dout  # the factor 2 is missing


double = layer(double_forward, double_backward, np.ones((2, 3)))
'''


def test_a_layer_in_a_case_file_is_run_by_the_cli_with_its_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(LAYER_FILE)
    assert main(["run", "mine.py", "--dtype", "float64", "--format", "json"]) == 1
    out = capsys.readouterr().out
    assert '"case": "double"' in out and '"culprit": "manual"' in out and '"line": 14' in out
    assert main(["list", "mine.py"]) == 0
    assert "double" in capsys.readouterr().out


def test_a_layer_in_a_case_file_is_collected_by_pytest(pytester: pytest.Pytester):
    pytester.makepyfile(**{"cases/mine": LAYER_FILE})
    result = pytester.runpytest("cases", "--bc-points", "0", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*double[[]cpu-float64[]]*", "*half the true gradient*"])


def test_layer_returns_a_case_outside_a_case_file():
    made = layer(L.affine_forward, L.affine_backward, (X, W, B), name="my_affine")
    assert made.name == "my_affine" and made.numpy and set(made.params) == {"x", "w", "b"}
    assert only(run(made, **CPU64)).verdict == "ok"
