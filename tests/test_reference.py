"""reference=: a low-precision kernel judged against a plain float64 reference (engine/reference.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import backprop_check as bc
from backprop_check.commands.cli import main
from backprop_check.engine import reference as kernels

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "low_precision.py"


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("_low_precision_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LP = _example()
ref = LP.rms_norm_reference


def inputs(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 64, generator=g).to(dtype), (1 + 0.5 * torch.randn(64, generator=g)).to(dtype)


def only(report: bc.Report) -> bc.Result:
    (result,) = [r for r in report.results if r.verdict != "skipped"]
    return result


def wrong(result: bc.Result) -> list[Any]:
    return [c for c in result.checks if c.verdict == "mismatch"]


# --- the targets ------------------------------------------------------------------------------


def test_a_correct_bfloat16_kernel_is_ok_at_the_given_and_random_points() -> None:
    result = only(bc.check(LP.RMSNorm.apply, inputs(), reference=ref, points=6))
    assert (result.verdict, result.dtype, result.points) == ("ok", "bfloat16", 7)
    assert "reference's own bfloat16 error" in result.message


@pytest.mark.parametrize(
    "slip, name, index",
    [
        pytest.param("twice a term", "x", None, id="a-factor-2-in-one-term-of-dx"),
        pytest.param("one element", "w", (LP.SLIPPED,), id="one-element-of-dw-off-by-1.25x"),
        pytest.param("half", "x", None, id="a-backward-that-halves-the-gradient"),
    ],
)
def test_each_slip_is_a_mismatch_of_autograd_with_the_element_named(slip: str, name: str, index: Any) -> None:
    result = only(bc.check(LP.rms_norm_kernel(slip).apply, inputs(), reference=ref, points=2))
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    check = wrong(result)[0]
    assert check.name == name and check.culprit == "autograd"
    if index is not None:
        assert check.index == index and check.bad == 1 and f"w[{LP.SLIPPED}]" in result.message
    assert "the reference's own bfloat16 error" in result.message and "× the tolerance" in result.message


def test_a_backward_that_halves_the_gradient_gets_the_half_hint() -> None:
    result = only(bc.check(LP.rms_norm_kernel("half").apply, inputs(), reference=ref))
    assert any("half the true gradient" in hint for hint in result.hints)


def test_one_wrong_element_is_no_factor_hint() -> None:
    result = only(bc.check(LP.rms_norm_kernel("one element").apply, inputs(), reference=ref))
    assert not any("twice" in hint or "half" in hint for hint in result.hints)


def test_the_drop_in_returns_true_for_the_kernel_and_raises_for_a_slip() -> None:
    assert bc.gradcheck(LP.RMSNorm.apply, inputs(), reference=ref) is True
    with pytest.raises(bc.GradcheckError, match="autograd is the odd one out"):
        bc.gradcheck(LP.rms_norm_kernel("one element").apply, inputs(), reference=ref)
    assert bc.gradcheck(LP.rms_norm_kernel("half").apply, inputs(), reference=ref, raise_exception=False) is False


def test_a_kernel_checks_rtol_and_atol_widen_its_tolerance_only_where_given() -> None:
    # A kernel that rounds an intermediate the reference never forms (flash-attention's D with O
    # stored in bfloat16) errs most at a few elements; its author can say how much it may.
    slipped = LP.rms_norm_kernel("one element").apply
    assert not bc.gradcheck(slipped, inputs(), reference=ref, raise_exception=False)
    assert bc.gradcheck(slipped, inputs(), reference=ref, rtol=0.5)
    assert bc.gradcheck(slipped, inputs(), reference=ref, rtol={"bfloat16": 0.5})
    assert not bc.gradcheck(slipped, inputs(), reference=ref, rtol={"float16": 0.5}, raise_exception=False)


def test_the_example_file_shows_the_right_kernel_ok_and_each_slip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = main(["run", str(EXAMPLE), "--device", "cpu", "--format", "json", "--output", str(out)])
    assert code == 1
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert results["rms_norm"]["verdict"] == "ok" and results["rms_norm"]["dtype"] == "bfloat16"
    for slipped in ("rms_norm_twice_a_term", "rms_norm_one_element", "rms_norm_half"):
        assert (results[slipped]["verdict"], results[slipped]["culprit"]) == ("mismatch", "autograd")


# --- soundness: a correct kernel is never called wrong, a slip is never let through -----------


def _kernel(forward: Any, backward: Any) -> Any:
    """A custom Function that computes `forward`/`backward` in float32 and returns its dtype."""

    class Kernel(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *args: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(*args)
            return forward(*(a.float() for a in args)).to(args[0].dtype)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
            args = ctx.saved_tensors
            return tuple(g.to(a.dtype) for g, a in zip(backward(grad.float(), *(a.float() for a in args)), args))

    return Kernel.apply


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1)


def composite_softmax(x: torch.Tensor) -> torch.Tensor:
    """Every step rounded to bfloat16: a less careful kernel than torch's fused softmax."""
    e = _rounded(torch.exp(x - x.max(-1, keepdim=True).values))
    return _rounded(e / _rounded(e.sum(-1, keepdim=True)))


def composite_softmax_backward(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:
    y = composite_softmax(x)
    return (_rounded(_rounded(g - _rounded((g * y).sum(-1, keepdim=True))) * y),)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


def split_k_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Two partial sums, each rounded to bfloat16: a cancelling element is rounded on the scale
    of its terms, which the reference (rounding once) does not show there."""
    h = x.shape[1] // 2
    return _rounded(_rounded(x[:, :h] @ w[:h]) + _rounded(x[:, h:] @ w[h:]))


def split_k_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.shape[1] // 2
    return g @ w.T, _rounded(_rounded(x[:h].T @ g[:h]) + _rounded(x[h:].T @ g[h:]))


@pytest.mark.parametrize(
    "kernel, reference, shapes",
    [
        pytest.param(_kernel(composite_softmax, composite_softmax_backward), softmax, [(6, 40)], id="softmax-rounded-at-every-step"),
        pytest.param(_kernel(split_k_matmul, split_k_backward), matmul, [(16, 64), (64, 8)], id="split-k-matmul"),
    ],
)
def test_a_correct_kernel_less_careful_than_its_reference_is_ok_at_many_random_points(
    kernel: Any, reference: Any, shapes: list[tuple[int, ...]]
) -> None:
    g = torch.Generator().manual_seed(1)
    given = tuple((2 * torch.randn(*s, generator=g)).to(torch.bfloat16) for s in shapes)
    result = only(bc.check(kernel, given, reference=reference, points=25))
    assert result.verdict == "ok", result.message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_other_precisions_a_right_kernel_is_ok_and_one_element_off_is_caught(dtype: torch.dtype) -> None:
    def slipped(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gx, gw = g @ w.T, x.T @ g
        gw[3, 2] *= 1.25
        return gx, gw

    g = torch.Generator().manual_seed(2)
    given = (torch.randn(8, 16, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype))
    right = only(bc.check(_kernel(matmul, lambda g, x, w: (g @ w.T, x.T @ g)), given, reference=matmul, points=3))
    assert (right.verdict, right.dtype) == ("ok", str(dtype).removeprefix("torch."))
    result = only(bc.check(_kernel(matmul, slipped), given, reference=matmul, points=1))
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert wrong(result)[0].index == (3, 2)


def test_the_tolerance_catches_a_quarter_off_where_the_reference_rounds_exactly() -> None:
    """An element whose own error is zero is still held to the 90th percentile of the tensor's own errors and a
    few ulps of itself: 1.25× is far outside, one ulp is inside."""
    reference = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    own = torch.tensor([0.0, 0.01, 0.01, 0.01], dtype=torch.float64)
    right = kernels.judge(reference + torch.tensor([2 ** -8, 0, 0, 0]), reference, own, torch.bfloat16)
    assert bool((right.error <= right.allowed).all())
    slipped = kernels.judge(reference * torch.tensor([1.25, 1, 1, 1]), reference, own, torch.bfloat16)
    assert (slipped.error > slipped.allowed).tolist() == [True, False, False, False]


def test_a_kernel_that_returns_nan_is_a_mismatch() -> None:
    kernel = _kernel(matmul, lambda g, x, w: (g @ w.T, torch.full_like(w, float("nan"))))
    given = (torch.randn(4, 8).to(torch.bfloat16), torch.randn(8, 2).to(torch.bfloat16))
    result = only(bc.check(kernel, given, reference=matmul))
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")


# --- the reference itself -----------------------------------------------------------------------


def test_a_reference_whose_backward_is_wrong_is_the_culprit_reference() -> None:
    def detached(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # BUG: r's gradient is cut
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + LP.EPS).detach() * w

    result = only(bc.check(LP.RMSNorm.apply, inputs(), reference=detached))
    assert (result.verdict, result.culprit) == ("mismatch", "reference")
    assert result.to_dict()["culprit"] == "reference"
    assert "reference is the odd one out" in result.message


def test_a_kernel_whose_forward_differs_names_no_culprit_for_its_gradient() -> None:
    result = only(bc.check(_kernel(lambda x: 2 * x, lambda g, x: (2 * g,)), torch.randn(5).to(torch.bfloat16), reference=lambda x: x))
    assert result.verdict == "mismatch" and result.culprit is None
    assert "output 0" in result.message and result.message.startswith("the kernel's forward is the odd one out")


def test_a_kernel_whose_forward_is_infinite_says_inf_times_the_tolerance() -> None:
    kernel = _kernel(lambda x: x * torch.inf, lambda g, x: (g,))
    result = only(bc.check(kernel, torch.randn(5).to(torch.bfloat16), reference=lambda x: x, points=0))
    assert result.verdict == "mismatch" and "inf× the tolerance" in result.message and "e+308" not in result.message


# --- bad input: one line each -------------------------------------------------------------------


def _error(fn: Any, given: Any, **options: Any) -> str:
    result = only(bc.check(fn, given, **options))
    assert result.verdict == "error"
    assert "\n" not in result.message
    return result.message


def test_a_kernel_that_refuses_float64_without_a_reference_is_told_to_give_one() -> None:
    message = _error(LP.RMSNorm.apply, inputs(), dtypes=["float64"])
    assert "give reference=" in message and "bfloat16" in message


@pytest.mark.parametrize(
    "reference, said",
    [
        pytest.param(lambda x, w: (ref(x, w), x), "returns 2 output(s), the kernel 1", id="two-outputs-for-one"),
        pytest.param(lambda x, w: ref(x, w).T, "has shape (64, 8), the kernel's (8, 64)", id="transposed"),
        pytest.param(lambda x, w: ref(x, w).to(torch.complex128), "is complex", id="complex-for-real"),
        pytest.param(lambda x, w: ref(x.bfloat16(), w.bfloat16()), "runs in low precision only", id="computes-in-bfloat16"),
        pytest.param(LP.RMSNorm.apply, "raised TypeError", id="refuses-float64-itself"),
    ],
)
def test_a_reference_that_cannot_serve_is_one_line(reference: Any, said: str) -> None:
    assert said in _error(LP.RMSNorm.apply, inputs(), reference=reference)


def test_an_unknown_dtype_name_is_one_line() -> None:
    case = bc.FunctionCase(LP.RMSNorm.apply, inputs(), reference=ref, dtypes=["bf16"])
    assert case.problem() is not None and "dtypes= names 'bf16'" in case.problem()


def test_function_case_dtypes_win_over_the_runs_dtypes() -> None:
    report = bc.run(LP.rms_norm, devices=["cpu"], dtypes=["float64", "float32"], points=0)
    assert [(r.dtype, r.verdict) for r in report.results] == [("bfloat16", "ok")]


# --- order 2: the kernel's double backward against the reference's ------------------------------


class RecomputingRMSNorm(torch.autograd.Function):
    """The example's kernel with a backward that recomputes r from x (so double backward sees
    dr/dx), where the example saves r from the forward (a constant to double backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        xf = x.float()
        return (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + LP.EPS) * w.float()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        g, xf = grad_y.float(), x.float()
        r = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + LP.EPS)
        x_hat = xf * r
        dx_hat = g * w.float()
        dx = r * (dx_hat - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True))
        return dx.to(x.dtype), (g * x_hat).sum(0).to(w.dtype)


def test_gradgradcheck_with_a_reference_passes_a_differentiable_backward() -> None:
    assert bc.gradgradcheck(RecomputingRMSNorm.apply, inputs(), reference=ref) is True


def test_a_backward_that_saves_r_is_right_to_first_order_and_wrong_to_the_second() -> None:
    report = bc.check(LP.RMSNorm.apply, inputs(), reference=ref, order=2)
    first, second = (r for r in report.results if r.verdict != "skipped")
    assert first.verdict == "ok"
    assert (second.verdict, second.culprit, second.order) == ("mismatch", "autograd", 2)
    assert "double backward" in second.message


class _SoftmaxInPlace(torch.autograd.Function):
    """A bfloat16 softmax whose backward reuses grad_output's memory (Liger's style), or returns
    a float32 gradient: right values, and two hazards the contract finds."""

    widen = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.softmax(x.float(), -1).to(x.dtype)
        ctx.save_for_backward(y)
        return y

    @classmethod
    def backward(cls, ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        if cls.widen:
            return y.float() * (g.float() - (g.float() * y.float()).sum(-1, keepdim=True))
        s = (g.float() * y.float()).sum(-1, keepdim=True)
        return g.sub_(s.to(g.dtype)).mul_(y)  # grad_output overwritten


class _SoftmaxWide(_SoftmaxInPlace):
    widen = True


@pytest.mark.parametrize(
    "kernel, said",
    [
        pytest.param(_SoftmaxInPlace, "in_place: the backward of _SoftmaxInPlace modifies grad_output", id="grad-output-edited-in-place"),
        pytest.param(_SoftmaxWide, "grad_meta: the backward of _SoftmaxWide returns a float32 gradient", id="float32-gradient-for-bfloat16"),
    ],
)
def test_a_kernel_is_held_to_the_contract_items_that_read_no_values(kernel: Any, said: str) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    result = only(bc.check(kernel.apply, (x,), reference=lambda x: torch.softmax(x, -1), points=0))
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert said in result.message, result.message


def _causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t = q.shape[-2]
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -float("inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("dtype, seed", [(torch.bfloat16, 1), (torch.float16, 2)], ids=["bfloat16", "float16"])
def test_torchs_fused_attention_is_ok_against_the_plain_math(dtype: torch.dtype, seed: int) -> None:
    """torch's own flash kernel (F.scaled_dot_product_attention) against softmax(QKᵀ/√d)·V with
    sharp logits: its errors are the reference's in size (half its largest) but not element for
    element, and held to the median own error it was called wrong at 4 of 6 seeds."""
    g = torch.Generator().manual_seed(101)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=g) for _ in range(3))
    inputs = tuple(t.to(dtype) for t in (3 * q, k, v))

    def sharp(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"q": 3 * torch.randn(1, 2, 128, 64, generator=gen)}

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    result = only(bc.check(kernel, inputs, reference=_causal_reference, sample=sharp, seed=seed))
    assert result.verdict == "ok", result.message


def test_a_reference_that_overflows_the_kernels_dtype_excuses_nothing() -> None:
    """x·x past float16's 65504 makes the reference's own float16 error as large as the values:
    as a yardstick it let a kernel that halves its gradient pass. Its overflowing runs excuse
    nothing now: the kernel is held to its ulps, and the result says why."""

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w

    def kernel(halve: bool) -> Any:
        class RMSNorm(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                r = torch.rsqrt((x.float() * x.float()).mean(-1, keepdim=True) + 1e-6)  # float32 inside
                ctx.save_for_backward(x, w, r)
                return (x.float() * r * w.float()).to(x.dtype)

            @staticmethod
            def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                x, w, r = ctx.saved_tensors
                xh, dxh = x.float() * r, g.float() * w.float()
                dx, dw = r * (dxh - xh * (dxh * xh).mean(-1, keepdim=True)), (g.float() * xh).sum(0)
                if halve:
                    dx, dw = dx / 2, dw / 2
                return dx.to(x.dtype), dw.to(w.dtype)

        return RMSNorm.apply

    gen = torch.Generator().manual_seed(0)
    given = ((300 * torch.randn(4, 256, generator=gen)).half(), (1 + 0.3 * torch.randn(256, generator=gen)).half())

    def large(g: torch.Generator) -> dict[str, torch.Tensor]:
        return {"x": 300 * torch.randn(4, 256, generator=g)}

    right = only(bc.check(kernel(False), given, reference=rms, sample=large, points=1))
    assert right.verdict == "ok", right.message
    assert any("the reference overflows float16 here" in note for note in right.notes), right.notes
    halved = only(bc.check(kernel(True), given, reference=rms, sample=large, points=1))
    assert (halved.verdict, halved.culprit) == ("mismatch", "autograd"), halved.message


@pytest.mark.parametrize("factor, named", [(1.1, None), (2.0, "twice the true gradient")], ids=["1.1x-no-name", "2x-twice"])
def test_a_factor_is_named_only_near_the_named_one_even_in_bfloat16(factor: float, named: str | None) -> None:
    """bfloat16's hint rtol (5e-2) times 10 read a gradient 1.1× the truth as "twice"."""
    kernel = _kernel(matmul, lambda g, x, w: (factor * (g @ w.T), x.T @ g))
    g = torch.Generator().manual_seed(3)
    given = (torch.randn(16, 32, generator=g).to(torch.bfloat16), torch.randn(32, 8, generator=g).to(torch.bfloat16))
    result = only(bc.check(kernel, given, reference=matmul, points=0))
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    if named is None:
        assert not any("twice" in hint for hint in result.hints), result.hints
    else:
        assert any(named in hint for hint in result.hints), result.hints
