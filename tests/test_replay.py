"""The replayed forward (sources/replay.py): for every element of every parameter, the loss
it gives at a perturbed point is the loss the forward itself gives there; a forward it cannot
replay says so; and the numerical referee gives the same estimates with it as without it."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import backprop_check
from backprop_check.model.points import given_point
from backprop_check.sources import batches, numerical, replay
from backprop_check.sources.replay import Program, Unreplayable


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mlp(W1, b1, W2, b2, X, Y):  # noqa: ANN001, ANN201 - the shapes of the benchmark's MLP
    a = torch.tanh(X @ W1 + b1)
    return ((a @ W2 + b2 - Y) ** 2).mean()


def classifier(W1, b1, W2, b2, X, labels):  # noqa: ANN001, ANN201 - F.linear: addmm of a transpose
    a = torch.relu(F.linear(X, W1, b1))
    return F.cross_entropy(F.linear(a, W2, b2), labels)


def reductions(W, s, X):  # noqa: ANN001, ANN201 - sums over dims, kept dims, a 0-d parameter
    z = torch.sigmoid(X @ W) * s
    rows = z.sum(dim=1, keepdim=True)
    return (z / rows).mean(dim=0).sum() + torch.softmax(z, dim=0)[0].sum() + z.mean()


def views(W, b, X):  # noqa: ANN001, ANN201 - transposes, permutes, expands, reshapes
    z = (W.T @ X.T).T + b.unsqueeze(0).expand(X.shape[0], -1)
    z = z.reshape(-1, 2).permute(1, 0).contiguous().view(-1)
    return torch.log_softmax(z.unsqueeze(0), dim=1).squeeze(0)[::3].sum()


def shared(W, X):  # noqa: ANN001, ANN201 - a value used twice, a product of two changed values
    z = X @ W
    return (z * z).sum() + (W @ W.T).trace() + torch.cat([z, W[:2]], dim=0).abs().sum()


def kinks(W, b, X):  # noqa: ANN001, ANN201 - where, clamp, max: elementwise and dense rules
    z = X @ W + b
    z = torch.where(z > 0, z, 0.1 * z).clamp(max=1.5)
    return z.amax(dim=1).sum() + torch.maximum(z, -z).mean()


def layers(W, b, g, X):  # noqa: ANN001, ANN201 - layer norm and a 1-d convolution: dense under vmap
    z = F.layer_norm(X @ W + b, (W.shape[1],), weight=g)
    return F.conv1d(z.unsqueeze(1), g[:3].reshape(1, 1, 3)).pow(2).sum()


def batched_matmul(W, X):  # noqa: ANN001, ANN201 - matmul of 3-d tensors (bmm, no rule of its own)
    return torch.tanh(X @ W).sum()


def tiles(W, b, X):  # noqa: ANN001, ANN201 - a tile kernel's writes into a tensor it made
    z = X @ W + b
    out = torch.zeros_like(z)
    before = out[:, :2]  # a view taken before the writes, read after them: it sees them
    middle = 0.0
    for j in range(0, z.shape[1], 2):
        out[:, j : j + 2] = torch.tanh(z[:, j : j + 2]) * (j + 1)
        middle = middle + (out * z[:, -1:]).sum()  # the tensor as it is between two writes
    out[0] = out[0] * 0.5  # reads the tensor, writes one row
    out.t()[1] = z[:, 1]  # through a transpose
    scores = X.reshape(1, *X.shape) @ W  # matmul: its result a view of an mm's (_unsafe_view)
    scores[0, :, 0] = 0.5 * scores[0, :, 1]
    acc = z * 2 + scores.sum()
    acc.add_(out).mul_(z)  # in place, as an accumulator is
    acc[1:].sub_(1.0, alpha=0.5)
    out += acc
    lse = z.new_empty(z.shape[0])
    lse[0] = 0.0 * z[0, 0]
    lse[1:] = torch.logsumexp(out[1:], dim=1)  # broadcast into a slice
    return (out**2).sum() + before.sum() + lse.sum() + middle


def masked(W, X):  # noqa: ANN001, ANN201 - masks drawn in place under a seed the forward sets
    torch.manual_seed(7)  # as op_db's wrapper_set_seed does: the same masks at every call
    z = F.feature_alpha_dropout(X @ W, p=0.5, training=True)  # new_empty, bernoulli_, in-place arithmetic
    keep = z.new_empty(z.shape).uniform_() > 0.3
    return (torch.tanh(z) * keep).sum()


FORWARDS = {
    "mlp": (mlp, {"W1": (6, 5), "b1": (5,), "W2": (5, 1), "b2": (1,)}, {"X": (4, 6), "Y": (4, 1)}),
    "classifier": (classifier, {"W1": (5, 6), "b1": (5,), "W2": (3, 5), "b2": (3,)}, {"X": (4, 6)}),
    "reductions": (reductions, {"W": (4, 3), "s": ()}, {"X": (5, 4)}),
    "views": (views, {"W": (4, 6), "b": (6,)}, {"X": (3, 4)}),
    "shared": (shared, {"W": (4, 4)}, {"X": (3, 4)}),
    "kinks": (kinks, {"W": (4, 5), "b": (5,)}, {"X": (3, 4)}),
    "layers": (layers, {"W": (4, 6), "b": (6,), "g": (6,)}, {"X": (3, 4)}),
    "batched_matmul": (batched_matmul, {"W": (2, 4, 3)}, {"X": (2, 5, 4)}),
    "tiles": (tiles, {"W": (4, 6), "b": (6,)}, {"X": (3, 4)}),
    "masked": (masked, {"W": (4, 6)}, {"X": (3, 4)}),
}


def _inputs(name: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    _, params, data = FORWARDS[name]
    leaves = {k: _randn(*shape, seed=seed + i) for i, (k, shape) in enumerate(params.items())}
    values = {k: _randn(*shape, seed=seed + 100 + i) for i, (k, shape) in enumerate(data.items())}
    if name == "classifier":
        values["labels"] = torch.tensor([0, 2, 1, 2])
    return leaves, values


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_every_perturbed_loss_is_the_forwards_own(name: str, seed: int) -> None:
    leaves, data = _inputs(name, seed)
    _replays_exactly(FORWARDS[name][0], leaves, data, (1e-3, 0.5, -0.5, -1e-3), name)


def _replays_exactly(fn, leaves, data, offsets, label):  # noqa: ANN001, ANN202
    """Every element of every leaf, moved by each offset: the replayed loss is the forward's own."""
    with torch.no_grad():
        program = Program.record(lambda traced: fn(**dict(zip(leaves, traced)), **data), list(leaves.values()))
        for number, (leaf, value) in enumerate(leaves.items()):
            pos = torch.arange(value.numel()).repeat_interleave(len(offsets))
            new = value.reshape(-1)[pos] + torch.tensor(offsets, dtype=torch.float64).repeat(value.numel())
            got = program(number, pos, new)
            want = []
            for p, v in zip(pos.tolist(), new):
                moved = value.clone()
                moved.view(-1)[p] = v
                want.append(fn(**{**leaves, leaf: moved}, **data))
            torch.testing.assert_close(got, torch.stack(want), rtol=1e-13, atol=1e-13, msg=f"{label}: {leaf}")


def test_a_value_read_into_python_or_changed_in_place_cannot_be_replayed() -> None:
    W = _randn(3, 3, seed=0)

    def branches(traced):  # noqa: ANN001, ANN202
        (w,) = traced
        return w.sum() if float(w[0, 0]) > 0 else -w.sum()

    def in_place(traced):  # noqa: ANN001, ANN202 - an input changed in place
        traced[0].mul_(2)
        return traced[0].sum()

    def numpy(traced):  # noqa: ANN001, ANN202 - the memory read behind torch's back
        return torch.from_numpy(traced[0].numpy() ** 2).sum()

    def raw(traced):  # noqa: ANN001, ANN202 - as a C++ loop over the data pointer would
        memory = torch.empty(0, dtype=torch.float64).set_(traced[0].untyped_storage())
        return (memory.reshape(3, 3) ** 2).sum()

    buffer = torch.ones(3, 3, dtype=torch.float64)

    def changes_what_it_read(traced):  # noqa: ANN001, ANN202
        z = traced[0] * buffer
        buffer.mul_(2)
        return z.sum()

    with pytest.raises(Unreplayable, match="into Python"):
        Program.record(branches, [W])
    with pytest.raises(Unreplayable, match="in place"):
        Program.record(in_place, [W])
    with pytest.raises(Unreplayable):
        Program.record(numpy, [W])
    with pytest.raises(Unreplayable, match="the recorded loss is nan"):
        Program.record(raw, [W], expected=(W**2).sum())
    with pytest.raises(Unreplayable, match="in place"):
        Program.record(changes_what_it_read, [W])

    def writes_its_input(traced):  # noqa: ANN001, ANN202
        traced[0][0] = traced[0][1] * 2
        return traced[0].sum()

    def writes_a_diagonal(traced):  # noqa: ANN001, ANN202 - a view with no scatter of its own here
        out = torch.zeros_like(traced[0])
        out.diagonal().copy_(traced[0][0])
        return out.sum()

    def writes_a_chunk(traced):  # noqa: ANN001, ANN202 - a view among several (split, unbind)
        z = traced[0] * 2
        z.chunk(3)[1].copy_(traced[0][0])
        return z.sum()

    big = _randn(16, 16, seed=1)

    def draws_each_time(traced):  # noqa: ANN001, ANN202 - no seed set: another mask at each call
        return (traced[0] * traced[0].new_empty(traced[0].shape).bernoulli_(0.5)).sum()

    def fills_what_it_read(traced):  # noqa: ANN001, ANN202 - a made tensor filled, read, then filled again
        noise = traced[0].new_empty(traced[0].shape).bernoulli_(0.5)  # a value: nothing read it yet
        z = traced[0] * noise
        noise.bernoulli_(0.5)  # no out-of-place twin (uniform_'s, uniform, is replayed as a write)
        return (z + noise).sum()

    with pytest.raises(Unreplayable, match="the recorded loss is"):
        Program.record(draws_each_time, [big], expected=draws_each_time([big]))
    with pytest.raises(Unreplayable, match="in place"):
        Program.record(fills_what_it_read, [W])
    with pytest.raises(Unreplayable, match="an input"):
        Program.record(writes_its_input, [W])
    with pytest.raises(Unreplayable, match="in place"):
        Program.record(writes_a_chunk, [W])
    with pytest.raises(Unreplayable, match="a view it cannot replay"):
        Program.record(writes_a_diagonal, [W])
    program = Program.record(lambda traced: (traced[0] * buffer).sum(), [W])
    buffer.add_(1)  # a module's buffer, updated between two forward passes
    with pytest.raises(Unreplayable, match="since it was recorded"):
        program(0, torch.tensor([0]), torch.tensor([1.0]))


def _case(name: str) -> backprop_check.Case:
    fn = FORWARDS[name][0]
    leaves, data = _inputs(name, 3)
    return backprop_check.case(params=leaves, data=data, name=name)(fn)


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_the_referee_is_the_same_with_and_without_the_replay(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches, "REPLAY_FROM", 0)  # these tensors are small: replay them anyway
    monkeypatch.setattr(batches, "REPLAY_CASE_FROM", 0)
    case = _case(name)
    point = given_point(case, 0)
    reference = numerical.reference(case, point, torch.float64, full=True)
    programs = reference.differences.batched.programs.values()
    assert programs and all(program is not None for program in programs)
    replayed = reference.gradients
    monkeypatch.setattr(numerical.Batched, "program", lambda self, targets, flat, base: None)
    plain = numerical.reference(case, point, torch.float64, full=True).gradients
    for leaf in plain.values:
        # the same numbers up to the order of a sum: within either error bar, and the bars alike
        difference = (replayed.values[leaf] - plain.values[leaf]).abs()
        assert bool((difference <= torch.minimum(replayed.error[leaf], plain.error[leaf])).all()), leaf
        torch.testing.assert_close(replayed.error[leaf], plain.error[leaf], rtol=0.5, atol=1e-10)
        assert torch.equal(replayed.kink[leaf], plain.kink[leaf])


def test_a_replay_that_disagrees_with_the_forward_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong rule (here: every product off by 1e-6) is caught by the rows each chunk checks
    against a plain forward pass; the referee then runs the forward under vmap, and is right."""
    monkeypatch.setattr(batches, "REPLAY_FROM", 0)
    monkeypatch.setattr(batches, "REPLAY_CASE_FROM", 0)
    case = _case("mlp")
    point = given_point(case, 0)
    right = numerical.reference(case, point, torch.float64, full=True).gradients
    wrong_mm = replay.RULES[torch.ops.aten.mm.default]

    def off(program, step, states, count):  # noqa: ANN001, ANN202
        return [state + 1e-6 if isinstance(state, torch.Tensor) else replay.Sparse(state.pos, state.new + 1e-6)
                for state in wrong_mm(program, step, states, count)]

    monkeypatch.setitem(replay.RULES, torch.ops.aten.mm.default, off)
    checked = numerical.reference(case, point, torch.float64, full=True)
    programs = checked.differences.batched.programs.values()
    assert programs and all(program is None for program in programs)
    for leaf in right.values:
        torch.testing.assert_close(checked.gradients.values[leaf], right.values[leaf], rtol=1e-7, atol=1e-9)


def test_chunks_are_bounded_by_what_a_replay_holds() -> None:
    W = _randn(300, 200, seed=0)
    X = _randn(64, 300, seed=1)
    program = Program.record(lambda traced: torch.tanh(X @ traced[0]).sum(), [W])
    before = program.rows()
    assert before * 8 * 4 * 64 * 200 <= replay.STATE_BYTES
    program(0, torch.arange(8), W.reshape(-1)[:8] + 1e-3)
    # one changed element of W changes one column of X·W: 64 values, not 12,800
    assert program.widest is not None and program.widest <= 3 * 64 + 1
    assert program.rows() >= before
    assert math.isfinite(float(program(0, torch.tensor([5]), torch.tensor([0.5]))[0]))


def test_a_few_elements_or_huge_values_are_left_to_vmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay pays from REPLAY_FROM elements on, and only where a chunk holds enough rows."""
    case = _case("mlp")  # 41 elements in all
    reference = numerical.reference(case, given_point(case, 0), torch.float64, full=True)
    assert not reference.differences.batched.programs
    monkeypatch.setattr(batches, "REPLAY_FROM", 0)
    monkeypatch.setattr(batches, "REPLAY_CASE_FROM", 0)
    monkeypatch.setattr(replay, "STATE_BYTES", 8 * 4 * 20 * 10)  # 10 rows of the widest value
    reference = numerical.reference(case, given_point(case, 0), torch.float64, full=True)
    programs = reference.differences.batched.programs.values()
    assert programs and all(program is None for program in programs)  # probed, then left to vmap


def test_a_module_case_is_replayed_through_its_bound_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """nn.Linear and nn.Tanh on the parameters a point binds: the same estimates either way."""

    @backprop_check.case(
        module=lambda: torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)),
        data={"X": _randn(6, 12, seed=0), "Y": _randn(6, 3, seed=1)},
        name="sequential",
    )
    def sequential(model, X, Y):  # noqa: ANN001, ANN201
        return F.mse_loss(model(X), Y)

    monkeypatch.setattr(batches, "REPLAY_CASE_FROM", 0)  # 163 elements: a tiny check, replayed anyway
    point = given_point(sequential, 0)
    reference = numerical.reference(sequential, point, torch.float64, full=True)
    programs = reference.differences.batched.programs
    assert programs and all(program is not None for program in programs.values())  # 120 + 30 weights
    monkeypatch.setattr(numerical.Batched, "program", lambda self, targets, flat, base: None)
    plain = numerical.reference(sequential, point, torch.float64, full=True).gradients
    for leaf, values in plain.values.items():
        difference = (reference.gradients.values[leaf] - values).abs()
        assert bool((difference <= torch.minimum(reference.gradients.error[leaf], plain.error[leaf])).all()), leaf


def _random_forward(seed: int):  # noqa: ANN202
    """A forward of random ops the replay has rules for, on random shapes: (fn, leaves, data)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):  # noqa: ANN001, ANN202
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    n, k, m = (int(torch.randint(2, 6, (1,), generator=gen)) for _ in range(3))
    leaves = {"W": _randn(k, m, seed=seed), "b": _randn(m, seed=seed + 1), "s": _randn(seed=seed + 2)}
    X = _randn(n, k, seed=seed + 3)
    ops = [pick(["tanh", "sigmoid", "relu", "square", "scale", "bias", "where", "exp"]) for _ in range(3)]
    tail = pick(["softmax", "log_softmax0", "sum_keep", "mean_dim", "transpose_mm", "expand"])

    def fn(W, b, s, X):  # noqa: ANN001, ANN202
        z = X @ W if seed % 2 else F.linear(X, W.T)
        for op in ops:
            z = {
                "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "square": lambda v: v * v,
                "scale": lambda v: v * s, "bias": lambda v: v + b, "where": lambda v: torch.where(v > 0.1, v, -0.5 * v),
                "exp": lambda v: torch.exp(-v.abs()),
            }[op](z)
        if tail == "softmax":
            z = torch.softmax(z, dim=1)
        elif tail == "log_softmax0":
            z = torch.log_softmax(z, dim=0)
        elif tail == "sum_keep":
            z = z / (1 + z.abs().sum(dim=1, keepdim=True))
        elif tail == "mean_dim":
            z = z.mean(dim=0) * b
        elif tail == "transpose_mm":
            z = z.T @ X
        else:
            z = z.unsqueeze(0).expand(2, -1, -1) * s
        return (z * torch.arange(z.numel(), dtype=z.dtype).reshape(z.shape).cos()).sum()

    return fn, leaves, {"X": X}


@pytest.mark.parametrize("seed", range(24))
def test_random_forwards_replay_to_the_forwards_own_losses(seed: int) -> None:
    fn, leaves, data = _random_forward(seed)
    _replays_exactly(fn, leaves, data, (1e-4, -0.3), f"seed {seed}")


def test_a_time_limit_that_strikes_while_recording_is_not_swallowed() -> None:
    from backprop_check.errors import CaseTimeout

    def slow(traced):  # noqa: ANN001, ANN202 - as the SIGALRM of --timeout raises, mid-forward
        raise CaseTimeout("forward ran past its time limit of 1s (--timeout)")

    with pytest.raises(CaseTimeout):
        Program.record(slow, [_randn(2, seed=0)])


def test_a_tiny_check_is_left_to_vmap_and_a_large_one_replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer than REPLAY_CASE_FROM elements with a fast forward: vmap of the whole forward, no
    recording; the same check counted as large is replayed, with the same estimates."""
    case = _case("mlp")
    point = given_point(case, 0)
    monkeypatch.setattr(batches, "REPLAY_FROM", 0)
    tiny = numerical.reference(case, point, torch.float64, full=True)
    assert not tiny.differences.batched.programs
    monkeypatch.setattr(batches, "REPLAY_CASE_FROM", 0)
    large = numerical.reference(case, point, torch.float64, full=True)
    programs = large.differences.batched.programs.values()
    assert programs and all(program is not None for program in programs)
    for leaf, values in tiny.gradients.values.items():
        difference = (large.gradients.values[leaf] - values).abs()
        assert bool((difference <= torch.minimum(large.gradients.error[leaf], tiny.gradients.error[leaf])).all()), leaf


@pytest.mark.parametrize("length", [0, 1, 3, 10, 31, 32, 100])
@pytest.mark.parametrize("op", [torch.ops.aten._softmax.default, torch.ops.aten._log_softmax.default])
def test_a_short_softmax_in_plain_ops_is_atens_own(op: object, length: int) -> None:
    """Along a short dim the replay computes (log-)softmax in plain ops (faster there): the same
    values as aten's kernel, -inf entries (a masked logit) and a dim of one included."""
    x = _randn(7, 5, length, seed=length) * 30
    if length:
        x[0, 0, 0] = -math.inf
        x[1, 2] = -math.inf  # a whole row masked: NaN, as aten gives
    for dim in range(3):
        want = op(x, dim, False)
        got = replay._softmax_along(op, x.clone(), dim, False)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14, equal_nan=True)


def test_each_tensor_of_a_batch_is_in_storage_of_its_own_under_vmap() -> None:
    """`Flat.columns`: every row of every tensor starts its own storage (as_strided with an
    offset reads that tensor's values, never a neighbour's), and holds what `split` gives."""
    tensors = {"a": _randn(2, 3, seed=1), "b": _randn(4, seed=2), "c": _randn(3, 3, seed=3)}
    flat = batches.Flat(tensors)
    batch = torch.stack([flat.join(tensors) + k for k in range(5)])
    columns = flat.columns(batch)
    for k in range(5):
        split = flat.split(batch[k])
        for name in tensors:
            torch.testing.assert_close(columns[name][k], split[name], rtol=0, atol=0)
            assert columns[name].storage_offset() == 0 and columns[name].is_contiguous()
    # one tensor, a fresh batch: the rows themselves, not copied
    alone = batches.Flat({"c": tensors["c"]})
    rows = torch.stack([tensors["c"].reshape(-1)] * 3)
    assert alone.columns(rows)["c"].data_ptr() == rows.data_ptr()
    # ... but a batch that starts inside another storage is copied
    assert alone.columns(torch.cat([rows, rows])[1:])["c"].storage_offset() == 0

    def reads_storage(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (torch.as_strided(c, (2, 2), (1, 3), 1) ** 2).sum() + a.sum()

    @backprop_check.case(params={"a": tensors["a"], "c": tensors["c"]})
    def strided(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return reads_storage(a, c)

    grads = numerical.gradient(strided, given_point(strided, 0), "cpu", torch.float64)
    a, c = (tensors[k].clone().requires_grad_() for k in "ac")
    want = torch.autograd.grad(reads_storage(a, c), (a, c))
    torch.testing.assert_close(grads.values["a"], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads.values["c"], want[1], rtol=1e-10, atol=1e-12)


class _NoVmapRule(torch.autograd.Function):
    """tanh(x·W)·c summed, with a hand-written backward and no vmap rule: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, W, X, c):  # noqa: ANN001, ANN205
        z = torch.tanh(X @ W)
        ctx.save_for_backward(W, X, c, z)
        return (z * c).sum()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        W, X, c, z = ctx.saved_tensors
        return grad * X.T @ ((1 - z * z) * c), None, None


def test_a_forward_vmap_cannot_batch_is_replayed_once_a_recording_has_been_paid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled elements of a Function without a vmap rule: one forward pass each (6 per
    element) until the process has paid its first recording (the import a tensor subclass's
    first dispatch makes), replayed after it; the same estimates either way, and a slip in the
    sampled gradient found by both."""
    W, X, c = _randn(12, 10, seed=0), _randn(6, 12, seed=1), _randn(6, 10, seed=2)

    def make(slip: float) -> backprop_check.Case:
        @backprop_check.case(params={"W": W}, data={"X": X, "c": c}, name="no_vmap_rule")
        def no_vmap_rule(W: torch.Tensor, X: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return _NoVmapRule.apply(W, X, c)

        @no_vmap_rule.manual
        def _(W: torch.Tensor, X: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
            z = torch.tanh(X @ W)
            grad = X.T @ ((1 - z * z) * c)
            grad.view(-1)[17] *= 1 + slip
            return {"W": grad}

        return no_vmap_rule

    point = given_point(make(0.0), 0)
    monkeypatch.setattr(batches, "_first_recording_paid", lambda: False)  # as in a fresh process
    monkeypatch.setattr(batches.Looped, "seconds", 0.0)
    # where the loop costs less than a recording would (a busy machine's slow passes must not
    # tip the ski rental: that is timing, not what is checked here)
    paid_at = batches.FIRST_RECORDING
    monkeypatch.setattr(batches, "FIRST_RECORDING", math.inf)
    looped = numerical.reference(make(0.0), point, torch.float64)
    monkeypatch.setattr(batches, "FIRST_RECORDING", paid_at)
    assert not looped.differences.batched.vmap_works and not looped.differences.batched.programs
    monkeypatch.setattr(batches, "_first_recording_paid", lambda: True)
    replayed = numerical.reference(make(0.0), point, torch.float64)
    programs = replayed.differences.batched.programs.values()
    assert programs and all(program is not None for program in programs)
    for leaf in looped.gradients.values:
        mask = looped.gradients.checked.get(leaf)
        difference = (replayed.gradients.values[leaf] - looped.gradients.values[leaf]).abs()
        bars = torch.minimum(replayed.gradients.error[leaf], looped.gradients.error[leaf])
        assert bool((difference <= bars)[mask].all() if mask is not None else (difference <= bars).all()), leaf
    found = backprop_check.run(make(1e-4), dtypes=["float64"], points=0)
    assert found.results[0].verdict == "mismatch" and found.results[0].culprit == "manual"


class _TiledNoVmapRule(torch.autograd.Function):
    """tanh(a·b) written tile by tile into a tensor made from `a`, summed; no vmap rule."""

    @staticmethod
    def forward(ctx, a, b):  # noqa: ANN001, ANN205
        out = torch.empty_like(a)
        for i in range(0, a.shape[0], 2):
            out[i : i + 2] = torch.tanh(a[i : i + 2] * b)
        ctx.save_for_backward(a, b, out)
        return out.sum()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        a, b, out = ctx.saved_tensors
        inner = grad * (1 - out * out)
        return inner * b, (inner * a).sum(0)


def test_a_tiled_function_is_replayed_for_each_tensor_once_the_loop_has_cost_a_recording(monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples of each tensor of a tile kernel without a vmap rule: replayed (the tensor made
    from the other input, `empty_like(a)` while b is perturbed, is followed too) once the
    forward passes run one at a time have cost what the first recording costs; the same
    estimates as the loop's."""
    a, b = _randn(8, 40, seed=4), _randn(40, seed=5)

    @backprop_check.case(params={"a": a, "b": b}, name="tiled_no_vmap_rule")
    def tiled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _TiledNoVmapRule.apply(a, b)

    point = given_point(tiled, 0)
    monkeypatch.setattr(batches, "_first_recording_paid", lambda: False)
    monkeypatch.setattr(batches.Looped, "seconds", 0.0)
    monkeypatch.setattr(batches, "FIRST_RECORDING", 1e9)
    looped = numerical.reference(tiled, point, torch.float64)
    assert not looped.differences.batched.programs and batches.Looped.seconds > 0
    monkeypatch.setattr(batches, "FIRST_RECORDING", batches.Looped.seconds / 2)  # the loop has cost more
    replayed = numerical.reference(tiled, point, torch.float64)
    programs = replayed.differences.batched.programs
    assert set(programs) == {("a",), ("b",)} and all(program is not None for program in programs.values())
    for leaf, mask in looped.gradients.checked.items():
        difference = (replayed.gradients.values[leaf] - looped.gradients.values[leaf]).abs()[mask]
        bars = torch.minimum(replayed.gradients.error[leaf], looped.gradients.error[leaf])[mask]
        assert bool((difference <= bars).all()), leaf
