"""The custom-Function contract: each planted bug in tests/corpus/functions.py is found by its
own contract item, said in culprit language and naming the Function class; no twin fails."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import backprop_check as bc
from backprop_check.engine import contract

CORPUS = Path(__file__).resolve().parent / "corpus" / "functions.py"


def _corpus() -> Any:
    spec = importlib.util.spec_from_file_location("_contract_corpus", CORPUS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUNCTIONS = _corpus()
CONTRACT_BUGS = {name: names[1] for name, names in FUNCTIONS.NAMES.items() if names[0] == "contract"}


def x64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def contract_checks(report: bc.Report) -> dict[str, bc.report.Check]:
    (result,) = [r for r in report.results if r.point == "given point" or r.verdict == "mismatch"][:1]
    return {c.name: c for c in result.checks if c.kind == "contract"}


@pytest.fixture(scope="module")
def corpus_report() -> bc.Report:
    return bc.run([str(CORPUS)], devices=["cpu"], dtypes=["float64"], points=0)


@pytest.mark.parametrize(("name", "item"), sorted(CONTRACT_BUGS.items()), ids=sorted(CONTRACT_BUGS))
def test_each_planted_bug_is_found_by_its_contract_item(corpus_report: bc.Report, name: str, item: str) -> None:
    (result,) = [r for r in corpus_report.results if r.case == name]
    assert (result.verdict, result.culprit) == ("mismatch", "autograd"), result.message
    found = {c.name: c for c in result.checks if c.kind == "contract"}
    assert found[item].verdict == "mismatch", found[item].note
    assert found[item].culprit == "autograd"


@pytest.mark.parametrize("name", sorted(n for n, (v, _) in FUNCTIONS.EXPECTED.items() if v == "ok"))
def test_no_twin_breaks_the_contract(corpus_report: bc.Report, name: str) -> None:
    (result,) = [r for r in corpus_report.results if r.case == name]
    bad = [f"{c.name}: {c.note}" for c in result.checks if c.kind == "contract" and c.verdict != "ok"]
    assert bad == []


@pytest.mark.parametrize(
    ("name", "words"),
    [
        pytest.param("ignores_grad_output", "the backward of SquareIgnoresGrad ignores grad_output of output 0", id="ignores-grad-output"),
        pytest.param("undefined_grad_unhandled", "the backward of TwoProducts fails when", id="undefined-grad"),
        pytest.param("backward_not_repeatable", "the backward of Drifting is not repeatable", id="not-repeatable"),
        pytest.param("gradient_of_wrong_dtype", "returns a bfloat16 gradient for input `x`, which is float64", id="wrong-dtype"),
        pytest.param("gradient_of_wrong_shape", "returns a gradient of shape (1, 4) for input `w`, of shape (4,)", id="wrong-shape"),
        pytest.param("assumes_contiguous_input", "for non-contiguous inputs", id="non-contiguous"),
        pytest.param("wrong_vmap_rule", "Normalized gives a different output 0 under torch.func.vmap", id="vmap-rule"),
        pytest.param("modifies_grad_output", "the backward of ScalesGradInPlace modifies grad_output of output 0 in place", id="in-place"),
    ],
)
def test_the_finding_names_the_function_class_in_culprit_language(corpus_report: bc.Report, name: str, words: str) -> None:
    (result,) = [r for r in corpus_report.results if r.case == name]
    notes = " | ".join(c.note or "" for c in result.checks if c.kind == "contract" and c.verdict == "mismatch")
    assert words in notes


def test_the_repeatable_check_reports_its_measured_spread_and_honours_nondet_tol() -> None:
    args = (x64(3, 4),)
    strict = bc.check(FUNCTIONS.Drifting.apply, args, dtypes=["float64"], points=0, contract=("repeatable",))
    check = contract_checks(strict)["repeatable"]
    assert check.verdict == "mismatch" and 0 < check.abs_err < 1e-14 and "nondet_tol 0" in check.note
    loose = bc.check(FUNCTIONS.Drifting.apply, args, dtypes=["float64"], points=0, contract=("repeatable",), nondet_tol=1e-9)
    assert loose.exit_code == 0
    assert "spread" in contract_checks(loose)["repeatable"].note


def test_a_message_shows_the_contract_finding_when_the_values_agree(corpus_report: bc.Report) -> None:
    (result,) = [r for r in corpus_report.results if r.case == "modifies_grad_output"]
    assert result.message.startswith("autograd is the odd one out at the given point: in_place: the backward of")


def test_contract_items_can_be_chosen() -> None:
    report = bc.check(FUNCTIONS.SquareIgnoresGrad.apply, (x64(3),), dtypes=["float64"], points=0, contract=("repeatable",))
    assert set(contract_checks(report)) == {"repeatable"}
    unknown = bc.check(torch.sin, (x64(3),), contract=("speed",))
    assert unknown.exit_code == 2 and "contract= names 'speed'" in unknown.results[0].message


def test_plain_functions_are_held_to_the_contract_too() -> None:
    report = bc.check(lambda x, w: (x @ w).relu(), (x64(4, 3), x64(3, 2, seed=1)), dtypes=["float64"], points=0)
    assert report.exit_code == 0
    assert set(contract_checks(report)) == set(contract.ITEMS)


def test_custom_functions_are_found_in_autograds_graph() -> None:
    x = x64(3).requires_grad_()
    y = FUNCTIONS.Square.apply(FUNCTIONS.ScaleTanh.apply(x * 2, x)[1])
    assert contract.custom_functions((y,)) == ["Square", "ScaleTanh"]


def test_float64s_own_rounding_is_measured_only_where_a_comparison_needs_it(monkeypatch) -> None:
    # Two more forward and backward passes (`Probe._sensitivity`) widen a comparison's allowance:
    # where every item's values agree within the tolerance alone they are not run.
    measured: list[int] = []
    sensitivity = contract.Probe._sensitivity
    monkeypatch.setattr(contract.Probe, "_sensitivity", lambda self: measured.append(1) or sensitivity(self))
    report = bc.check(lambda x, w: (x @ w).tanh(), (x64(4, 3), x64(3, 2, seed=1)), dtypes=["float64"], points=0)
    assert report.exit_code == 0 and set(contract_checks(report)) == set(contract.ITEMS)
    assert measured == []


def test_a_forward_that_refuses_a_layout_with_an_error_is_not_compared_there():
    # A kernel that asserts contiguous input refuses the layout: no finding against its backward,
    # which is right (torch's gradcheck passes it); the note says what was not compared.
    class NeedsContiguous(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            assert x.is_contiguous(), "kernel needs contiguous input"
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    args = (x64(3, 4),)
    assert bc.gradcheck(NeedsContiguous.apply, args)
    (result,) = bc.check(NeedsContiguous.apply, args, dtypes=["float64"], points=0).results
    (layout,) = [c for c in result.checks if c.name == "layout"]
    assert layout.verdict == "ok" and "non-contiguous: fn refuses it" in layout.note


def test_a_backward_that_fails_for_a_layout_its_forward_accepted_is_still_a_finding():
    class BackwardNeedsContiguous(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return 2 * x.view(-1).view(x.shape) * grad

    args = (x64(3, 4),)
    (result,) = bc.check(BackwardNeedsContiguous.apply, args, dtypes=["float64"], points=0).results
    (layout,) = [c for c in result.checks if c.name == "layout"]
    assert layout.verdict == "mismatch" and "the backward of BackwardNeedsContiguous fails for" in layout.note, layout.note


class _LayerNorm(torch.autograd.Function):
    """A correct layer norm with its hand-written backward."""

    @staticmethod
    def forward(ctx, x, w, b):  # noqa: ANN001, ANN205
        mu = x.mean(-1, keepdim=True)
        rstd = 1 / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
        xhat = (x - mu) * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w + b

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        xhat, rstd, w = ctx.saved_tensors
        gxh = g * w
        gx = rstd * (gxh - gxh.mean(-1, keepdim=True) - xhat * (gxh * xhat).mean(-1, keepdim=True))
        return gx, (g * xhat).sum(0), g.sum(0)


@pytest.mark.parametrize(("features", "offset", "seed"), [(64, 1e4, 0), (16, 1e4, 2), (64, 1e5, 1)], ids=["64-at-1e4", "16-at-1e4", "64-at-1e5"])
def test_a_float32_layout_that_sums_in_another_order_is_rounding_not_a_finding(features: int, offset: float, seed: int) -> None:
    # Sensor readings near 1e4 in float32: torch sums a strided row in another order than a
    # contiguous one, and the layer norm's outputs and gradients round 2–3× as far from float64
    # (1.2e-3 against 5e-4 at 1e4). The allowance is the dtype's own error, REORDERED times over.
    g = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(8, features, generator=g, dtype=torch.float64)).float().requires_grad_()
    w = (1 + 0.1 * torch.randn(features, generator=g, dtype=torch.float64)).float().requires_grad_()
    b = (0.1 * torch.randn(features, generator=g, dtype=torch.float64)).float().requires_grad_()
    assert bc.gradcheck(_LayerNorm.apply, (x, w, b))


@pytest.mark.parametrize("seed", [2, 4])
def test_a_float64_layout_whose_attention_rounds_in_another_order_is_rounding_not_a_finding(seed: int) -> None:
    # nn.MultiheadAttention (kdim, vdim of its own) at inputs of 1e2 in float64: column-major
    # inputs give gradients 2.4 times as far from the contiguous ones as four ulps of the inputs
    # move them; `layout` said autograd was wrong where torch's gradcheck passes.
    from torch.func import functional_call

    torch.manual_seed(seed)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=6).double().eval()
    params = {name.replace(".", "__"): p.detach().clone().requires_grad_() for name, p in attention.named_parameters()}

    def fn(x: torch.Tensor, **weights: torch.Tensor) -> torch.Tensor:
        named = {name.replace("__", "."): w for name, w in weights.items()}
        return functional_call(attention, named, (x, x[..., :6], x[..., :6]), {"need_weights": False})[0]

    x = (torch.randn(2, 4, 8, dtype=torch.float64) + 100).requires_grad_()
    (result,) = bc.check(fn, {"x": x, **params}, dtypes=["float64"], points=0).results
    assert str(result.verdict) == "ok", result.message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_a_forward_that_reads_storage_as_contiguous_is_named_as_the_forward(dtype: torch.dtype) -> None:
    x = x64(3, 4).to(dtype)
    report = bc.check(FUNCTIONS.ContiguousOnly.apply, (x,), dtypes=[str(dtype).removeprefix("torch.")], points=0)
    (result,) = report.results
    (layout,) = [c for c in result.checks if c.name == "layout"]
    assert layout.verdict == "mismatch" and layout.note.startswith("the forward of FlatSquare gives a different output 0"), layout.note
    assert any("FlatSquare.forward (a kernel that reads storage as if it were contiguous" in hint for hint in result.hints), result.hints


def test_a_backward_that_raises_is_the_users_error_with_its_line_not_an_internal_one() -> None:
    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return x * 2

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            return (g * 2,).clone()  # the slip: a tuple has no clone

    (result,) = bc.check(Broken.apply, (x64(3),), dtypes=["float64"], points=0).results
    line = Broken.backward.__code__.co_firstlineno + 2
    assert result.verdict == "error" and "internal error" not in result.message
    assert f"autograd failed: AttributeError: 'tuple' object has no attribute 'clone' (at test_contract.py:{line})" in result.message
    with pytest.raises(bc.CaseError, match="autograd failed: AttributeError"):
        bc.gradcheck(Broken.apply, (x64(3).requires_grad_(),))


def test_the_drop_in_answers_true_where_no_output_is_floating_point_as_torch_does() -> None:
    x = x64(4, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: a.argmax(), (x,))
    assert bc.gradcheck(lambda a: a.argmax(), (x,)) and bc.gradcheck(lambda a: (a > 0).long(), (x,))
    # check() still says there is nothing to check, and a detached float output is still a finding
    assert bc.check(lambda a: a.argmax(), (x.detach(),)).exit_code == 2
    with pytest.raises(bc.GradcheckError, match="no gradient\nflows back|no gradient flows back|autograd is the odd one out"):
        bc.gradcheck(lambda a: a.detach() * 2, (x,))


def test_inputs_given_as_a_dict_are_passed_by_name_in_any_order() -> None:
    a, b = x64(2), x64(3, seed=1)
    seen: list[tuple[int, int]] = []

    def f(a, b, *, scale=1.0):  # noqa: ANN001, ANN202
        seen.append((a.numel(), b.numel()))
        return a.sum() * b**2 * scale

    def manual(g, a, b, scale):  # noqa: ANN001, ANN202 - a slip in dloss/da only (×3)
        return 3 * (g * b**2).sum().expand(a.shape) * scale, g * 2 * a.sum() * b * scale, None

    (result,) = bc.check(f, {"b": b, "scale": 2.0, "a": a}, manual=manual, points=0, dtypes=["float64"]).results
    assert set(seen) == {(2, 3)}
    assert (result.verdict, result.culprit) == ("mismatch", "manual") and "input `a` at a[" in result.message, result.message


def test_a_manual_gradient_that_copies_a_wrong_backward_is_said_to_share_its_slip() -> None:
    class Swish(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x * torch.sigmoid(x)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return g * (s + x * (1 - s))  # the slip: s·(1 + x·(1 − s))

    def manual(g, x):  # noqa: ANN001, ANN202 - the same formula, copied
        s = torch.sigmoid(x)
        return (g * (s + x * (1 - s)),)

    (result,) = bc.check(Swish.apply, (x64(4),), manual=manual, dtypes=["float64"], points=0).results
    assert (result.verdict, result.culprit) == ("mismatch", "numerical")  # two against one, as documented
    assert any("may share one slipped derivation" in hint and "Swish" in hint for hint in result.hints), result.hints


class _AdjointLike(torch.autograd.Function):
    """torchdiffeq's adjoint layout: forward(ctx, shapes, func, x, t, w), non-tensors first."""

    @staticmethod
    def forward(ctx, shapes, func, x, t, w):
        ctx.save_for_backward(x, w)
        return torch.tanh(x @ w.T)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gz = g * (1 - torch.tanh(x @ w.T) ** 2)
        return None, None, gz @ w, None, (gz.T @ x).to(ctx.wrong_dtype or w.dtype)


@pytest.mark.parametrize("wrong_dtype", [None, torch.float32])
def test_grad_meta_pairs_each_gradient_with_its_argument_where_non_tensors_come_first(wrong_dtype) -> None:
    # The backward returns one value per argument, the node has an edge per tensor argument: x's
    # (3, 2) gradient was compared with w's (2, 2), and w's float32 one with t's missing edge.
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def fn(x, w):
        def forward(ctx, *args):
            ctx.wrong_dtype = wrong_dtype
            return _AdjointLike.forward(ctx, *args)

        return type("Adjoint", (_AdjointLike,), {"forward": staticmethod(forward)}).apply(None, torch.nn.Identity(), x, t, w)

    (result,) = bc.check(fn, {"x": x64(3, 2), "w": x64(2, 2, seed=1)}, dtypes=["float64"], points=0, contract=("grad_meta",)).results
    if wrong_dtype is None:
        assert result.verdict == "ok", result.message
    else:
        assert (result.verdict, result.culprit) == ("mismatch", "autograd"), result.message
        assert "float32 gradient for input `w`, which is float64: autograd casts it silently (precision is lost)" in result.message


def test_grad_meta_says_a_wider_gradient_loses_nothing() -> None:
    # A float64 gradient for a float32 input (fast-soft-sort's numpy backward) was "precision is lost".
    given, says = torch.float64, "nothing is lost"
    class Cast(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return (g * 2).to(given)

    x = torch.randn(3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    (result,) = bc.check(Cast.apply, {"x": x}, dtypes=["float32"], points=0, contract=("grad_meta",)).results
    assert result.verdict == "mismatch" and says in result.message, result.message
