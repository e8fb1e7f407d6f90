"""The numerical referee: its error bar bounds the true error, kinks are found, paths agree."""
from __future__ import annotations

import math

import pytest
import torch

from backprop_check import case
from backprop_check.model.points import given_point
from backprop_check.sources import batches, noise, numerical, stencil

KNOWN = [
    pytest.param(lambda t: (torch.sin(t) * torch.exp(t / 3)).sum(),
                 lambda t: torch.cos(t) * torch.exp(t / 3) + torch.sin(t) * torch.exp(t / 3) / 3, id="sin-times-exp"),
    pytest.param(lambda t: torch.log1p(t * t).sum(), lambda t: 2 * t / (1 + t * t), id="log1p-of-square"),
    pytest.param(lambda t: (t ** 3).sum() * 1e3, lambda t: 3e3 * t ** 2, id="large-cubic"),
    pytest.param(lambda t: torch.exp(5 * t).sum(), lambda t: 5 * torch.exp(5 * t), id="steep-exponential"),
    pytest.param(lambda t: torch.tanh(t).prod(), None, id="product-of-tanh"),
]


def _case(loss, values):
    @case(params={"t": values})
    def known(t):
        return loss(t)

    return known


@pytest.mark.parametrize("loss, derivative", KNOWN)
def test_error_bar_bounds_the_true_error(loss, derivative):
    values = torch.linspace(-2.0, 2.0, 17, dtype=torch.float64) * 1.37
    c = _case(loss, values)
    grads = numerical.gradient(c, given_point(c, 0), "cpu", torch.float64)
    if derivative is None:
        t = values.clone().requires_grad_(True)
        (true,) = torch.autograd.grad(loss(t), t)
    else:
        true = derivative(values)
    actual = (grads.values["t"] - true).abs()
    assert torch.all(actual <= grads.error["t"]), (actual / grads.error["t"]).max()
    # ... and the bar is tight enough to be worth having: far better than gradcheck's 1e-3.
    scale = true.abs().max()
    assert torch.all(grads.error["t"] <= 1e-7 * scale)


def test_reference_is_far_more_precise_than_a_plain_central_difference():
    values = torch.tensor([0.3, -1.1, 2.5], dtype=torch.float64)
    c = _case(lambda t: torch.exp(t).sum(), values)
    grads = numerical.gradient(c, given_point(c, 0), "cpu", torch.float64)
    error = (grads.values["t"] - torch.exp(values)).abs().max()
    eps = 1e-6  # gradcheck's step
    plain = ((torch.exp(values + eps) - torch.exp(values - eps)) / (2 * eps) - torch.exp(values)).abs().max()
    assert error < plain / 100


@pytest.mark.parametrize(
    "loss, at",
    [
        pytest.param(lambda t: torch.relu(t).sum(), 0.0, id="relu-at-zero"),
        pytest.param(lambda t: t.abs().sum(), 0.0, id="abs-at-zero"),
        pytest.param(lambda t: torch.maximum(t, torch.zeros_like(t)).sum() * 3, 0.0, id="max-at-a-tie"),
        pytest.param(lambda t: torch.relu(t - 1e-16).sum(), 0.0, id="relu-kink-closer-than-the-smallest-step"),
    ],
)
def test_kinks_are_detected_with_their_one_sided_derivatives(loss, at):
    values = torch.tensor([at, 1.5, -0.7], dtype=torch.float64)
    c = _case(loss, values)
    grads = numerical.gradient(c, given_point(c, 0), "cpu", torch.float64)
    assert grads.kink["t"].tolist() == [True, False, False]
    assert float(grads.left["t"][0]) != pytest.approx(float(grads.right["t"][0]), abs=0.1)


def test_a_kink_within_the_first_step_but_farther_than_a_smaller_one_is_no_kink():
    # relu(t − 1e-5) at t = 0 is differentiable (derivative 0): the first step (2⁻⁶) spans
    # the kink, a smaller one does not.
    values = torch.tensor([0.0, 1.5, -0.7], dtype=torch.float64)
    c = _case(lambda t: torch.relu(t - 1e-5).sum(), values)
    grads = numerical.gradient(c, given_point(c, 0), "cpu", torch.float64)
    assert grads.kink["t"].tolist() == [False, False, False]
    assert abs(float(grads.values["t"][0])) <= float(grads.error["t"][0])


def test_smooth_functions_show_no_kink_even_when_steep():
    values = torch.linspace(-3, 3, 41, dtype=torch.float64)
    c = _case(lambda t: (torch.exp(3 * t) + torch.sin(7 * t) + t ** 4).sum(), values)
    grads = numerical.gradient(c, given_point(c, 0), "cpu", torch.float64)
    assert not grads.kink["t"].any()


def test_batched_and_one_by_one_evaluation_give_the_same_numbers(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    X = torch.randn(5, 4, generator=gen, dtype=torch.float64)

    @case(params={"W": W}, data={"X": X})
    def net(W, X):
        return torch.tanh(X @ W).pow(2).mean()

    point = given_point(net, 0)
    # vmap's batches: the replay (replay.py) sums in another order; tests/test_replay.py
    monkeypatch.setattr(numerical.Batched, "program", lambda self, targets, flat, base: None)
    batched = numerical.gradient(net, point, "cpu", torch.float64)
    assert batched.note is None
    monkeypatch.setattr(numerical.Batched, "__init__", _loop_only)
    looped = numerical.gradient(net, point, "cpu", torch.float64)
    # vmap's batched matmul sums in another order than a plain call: the forward values differ
    # in their last bits, and the estimates by those bits over the step. Neither path is the
    # exact one, so the claim is the referee's own: both estimates lie within their error bars
    # of each other (and of the truth), and those bars are far below the float64 rtol.
    Wt = W.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(torch.tanh(X @ Wt).pow(2).mean(), Wt)
    gap = (batched.values["W"] - looped.values["W"]).abs()
    assert torch.all(gap <= batched.error["W"] + looped.error["W"])
    for grads in (batched, looped):
        assert torch.all((grads.values["W"] - true).abs() <= grads.error["W"])
        assert torch.all(grads.error["W"] <= 1e-8 * true.abs().max())  # far below rtol 1e-7


_BATCHED_INIT = numerical.Batched.__init__


def _loop_only(self, loss, vmap=True, linear=None):  # noqa: ARG001 - vmap never, whatever the case says
    # (nor the replay: a case vmap cannot batch in the loss is never recorded either)
    _BATCHED_INIT(self, loss, vmap=False)


def test_a_forward_pass_vmap_cannot_batch_falls_back_and_says_so():
    @case(params={"w": [0.5, -1.0]})
    def uses_item(w):
        if float(w.sum().item()) > 100:  # data-dependent Python control flow
            return w.sum()
        return (w ** 2).sum()

    grads = numerical.gradient(uses_item, given_point(uses_item, 0), "cpu", torch.float64)
    torch.testing.assert_close(grads.values["w"], torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert "vmap" in grads.note


class _FirstRowOnly(torch.autograd.Function):
    """x ↦ x², whose vmap rule computes the first batch element only and repeats it: a wrong
    rule that the rows after the first cannot be trusted under."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: ARG004 - torch's signature
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def vmap(info, in_dims, x):
        x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(info.batch_size, *x.shape)
        return (x[:1] * x[:1]).expand_as(x).clone(), 0


def test_a_wrong_vmap_rule_that_repeats_the_first_row_is_caught_and_the_forward_runs_one_by_one():
    @case(params={"w": [0.5, -1.0, 2.0]})
    def first_row_only(w):
        return _FirstRowOnly.apply(w).sum()

    grads = numerical.gradient(first_row_only, given_point(first_row_only, 0), "cpu", torch.float64)
    torch.testing.assert_close(grads.values["w"], torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64))
    assert "vmap" in grads.note


def test_forward_modes_referee_catches_the_same_wrong_vmap_rule():
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    d = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    estimate = numerical.along(lambda values: _FirstRowOnly.apply(values["w"]), {"w": w}, {"w": d})
    torch.testing.assert_close(estimate.value, 2 * w * d)


def test_steps_are_powers_of_two_so_that_theta_plus_h_is_exact():
    theta = torch.tensor([0.0, 1e-3, 3.7, -250.0, 1e6], dtype=torch.float64)
    h = stencil.steps_for(theta)
    assert torch.all(torch.log2(h) == torch.round(torch.log2(h)))
    assert torch.all((theta + h) - theta == h)
    assert torch.all(h <= 2 * stencil.RELATIVE_STEP * theta.abs().clamp(min=1))


def test_sampled_tensors_carry_directions_and_a_sample_only():
    values = torch.linspace(-1, 1, 3000, dtype=torch.float64)
    c = _case(lambda t: (t ** 3).sum(), values)
    grads = numerical.reference(c, given_point(c, 0), torch.float64).gradients
    checked = grads.checked["t"]
    assert int(checked.sum()) == numerical.SAMPLES
    assert torch.isnan(grads.values["t"][~checked]).all()
    for direction in grads.directions["t"]:
        assert float((3 * values ** 2 * direction.vector).sum()) == pytest.approx(direction.value, rel=1e-9)
    assert math.isfinite(grads.directions["t"][0].error)


def _net_case():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    X = torch.randn(7, 6, generator=gen, dtype=torch.float64)

    @case(params={"W": W}, data={"X": X})
    def net(W, X):
        return torch.tanh(X @ W).pow(2).mean()

    return net


def test_every_row_of_a_chunk_perturbs_exactly_one_element_even_when_the_buffer_is_reused(monkeypatch):
    # vmap's rows: the replay (replay.py) has none; tests/test_replay.py checks it
    monkeypatch.setattr(numerical.Batched, "program", lambda self, targets, flat, base: None)
    net = _net_case()
    point = given_point(net, 0)
    whole = numerical.gradient(net, point, "cpu", torch.float64)
    theta = point.params["W"].reshape(-1)
    seen: list[torch.Tensor] = []
    call = numerical.Batched.__call__

    def recording(self, targets, flat, batch):
        seen.append(batch.clone())
        return call(self, targets, flat, batch)

    # 2 elements (6 rows each) a chunk: 30 elements make 15 chunks through one buffer.
    monkeypatch.setattr(batches, "CHUNK_BYTES", 8 * theta.numel() * 12)
    monkeypatch.setattr(numerical.Batched, "__call__", recording)
    chunked = numerical.gradient(net, point, "cpu", torch.float64)
    # The noise probe's rows ride along in the first call (`FiniteDifferences._probe_rows`),
    # after its chunk's rows: the lines at each element's scale, then the wide lines where an
    # element is smaller than NOISE_WIDE_SCALE.
    probe = noise._noise_rows(theta, theta.abs()).shape[0]
    small = bool((theta.abs() < noise.NOISE_WIDE_SCALE).any())
    assert probe == noise.NOISE_ROWS + (noise.NOISE_WIDE_COUNT * (noise.NOISE_POINTS - 1) if small else 0)
    assert seen[0].shape[0] == 12 + probe
    assert not (seen[0][12:] == theta).all(dim=1).any()  # every probe row moves the point
    seen[0] = seen[0][:12]
    # the first pass; the elements whose bar is mostly truncation are then estimated again at
    # smaller steps (`settle`), through the same buffer
    assert [b.shape[0] for b in seen[:15]] == [12] * 15
    assert all(b.shape[0] % len(stencil.OFFSETS) == 0 for b in seen[15:])
    rows = torch.cat(seen)
    changed = rows != theta
    assert changed.sum(dim=1).tolist() == [1] * rows.shape[0]  # no stale perturbation left behind
    assert changed.any(dim=0).all()  # every element perturbed
    # the chunking changes no number
    assert torch.equal(chunked.values["W"], whole.values["W"])
    assert torch.equal(chunked.error["W"], whole.error["W"])


def test_a_chunk_holds_at_most_chunk_bytes_of_rows_at_any_size():
    for size in (1, 10, 1000, 10**6, 10**8):
        rows = batches.elements_per_chunk(size) * len(stencil.OFFSETS)
        assert rows <= batches.MAX_BATCH
        # one element (4 rows, the least a batch needs) even where a row alone exceeds the budget
        assert rows * size * 8 <= max(batches.CHUNK_BYTES, len(stencil.OFFSETS) * size * 8)
