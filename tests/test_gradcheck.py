"""`backprop_check.gradcheck`: a drop-in for `torch.autograd.gradcheck`."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import backprop_check as bc

CORPUS = Path(__file__).resolve().parent / "corpus" / "functions.py"
_spec = importlib.util.spec_from_file_location("_gradcheck_corpus", CORPUS)
assert _spec is not None and _spec.loader is not None
FUNCTIONS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(FUNCTIONS)
torch_gradcheck = importlib.import_module("torch.autograd.gradcheck")


def x64(*shape: int, seed: int = 0, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.requires_grad_(grad)


def test_true_where_torchs_gradcheck_is_true() -> None:
    args = (x64(3, 4), x64(4, seed=1))
    assert torch.autograd.gradcheck(FUNCTIONS.ScaleTanh.apply, args)
    assert bc.gradcheck(FUNCTIONS.ScaleTanh.apply, args) is True


def test_a_wrong_gradient_raises_a_runtime_error_with_the_harness_message() -> None:
    args = (x64(3, 4), x64(4, seed=1))
    with pytest.raises(RuntimeError) as raised:
        bc.gradcheck(FUNCTIONS.WrongOutput.apply, args)
    error = raised.value
    assert isinstance(error, bc.GradcheckError) and isinstance(error, torch_gradcheck.GradcheckError)
    text = str(error)
    for words in ("autograd is the odd one out", "output 1 → x", "numerical", "autograd ", "× the tolerance", "at x["):
        assert words in text
    assert error.result.culprit == "autograd"


def test_raise_exception_false_returns_false() -> None:
    assert bc.gradcheck(FUNCTIONS.WrongInput.apply, (x64(3, 4), x64(4, seed=1)), raise_exception=False) is False


def test_a_broken_function_raises_one_line_whatever_raise_exception_says() -> None:
    with pytest.raises(bc.CaseError, match="returned str, not a tensor"):
        bc.gradcheck(lambda x: "no", (x64(3),), raise_exception=False)


def test_float32_inputs_are_judged_fairly_where_torch_fails() -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    w = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not torch.autograd.gradcheck(lambda x, w: torch.tanh(x @ w), (x, w), raise_exception=False)
    assert bc.gradcheck(lambda x, w: torch.tanh(x @ w), (x, w))


def test_it_checks_the_inputs_own_dtype_only() -> None:
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return x.sin()

    bc.gradcheck(fn, (x64(3),))
    assert set(seen) == {torch.float64}


def test_ignored_options_are_named_in_one_warning() -> None:
    with pytest.warns(UserWarning) as caught:
        bc.gradcheck(torch.sin, (x64(3),), eps=1e-3, check_batched_forward_grad=True)
    (warning,) = caught
    assert str(warning.message) == (
        "backprop_check.gradcheck ignores eps= (the step is chosen per element), "
        "check_batched_forward_grad= (the vmap rule of a jvp is not checked)"
    )


class _WrongJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x.exp()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return grad * x.exp()

    @staticmethod
    def jvp(ctx, tangent):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return 1.01 * x.exp() * tangent


def test_check_forward_ad_checks_the_functions_jvp() -> None:
    assert bc.gradcheck(_WrongJvp.apply, (x64(3),))  # the backward alone is right
    with pytest.raises(bc.GradcheckError, match=r"_WrongJvp \(fwd\).*forward mode \(jvp\)"):
        bc.gradcheck(_WrongJvp.apply, (x64(3),), check_forward_ad=True)
    assert not bc.gradcheck(_WrongJvp.apply, (x64(3),), check_forward_ad=True, check_backward_ad=False, raise_exception=False)
    with pytest.raises(ValueError, match="nothing to check"):
        bc.gradcheck(torch.sin, (x64(3),), check_forward_ad=False, check_backward_ad=False)


def test_a_jvp_that_is_not_linear_in_its_tangent_fails_on_a_small_input() -> None:
    # right along every +e_j, not along -e_j: every other basis direction of a small input points down
    abs_tangent = type("AbsTangent", (_WrongJvp,), {"jvp": staticmethod(lambda ctx, t: ctx.saved_tensors[0].exp() * t.abs())})
    assert not bc.gradcheck(abs_tangent.apply, (x64(5),), check_forward_ad=True, raise_exception=False)


def test_gradgradcheck_checks_forward_over_reverse_where_asked_as_torchs_does() -> None:
    # torch's gradgradcheck(check_fwd_over_rev=True) fails a Function whose jvp is wrong; the
    # drop-in ignored the keyword (a warning, and True): one import line lost a check.
    assert bc.gradgradcheck(_WrongJvp.apply, (x64(3),))  # reverse over reverse alone is right
    with pytest.raises(bc.GradcheckError, match=r"_WrongJvp \((order 2, )?fwd\).*forward mode"):
        bc.gradgradcheck(_WrongJvp.apply, (x64(3),), check_fwd_over_rev=True)
    assert not bc.gradgradcheck(
        _WrongJvp.apply, (x64(3),), check_fwd_over_rev=True, check_rev_over_rev=False, raise_exception=False
    )
    assert bc.gradgradcheck(torch.tanh, (x64(3),), check_fwd_over_rev=True, check_rev_over_rev=False)
    with pytest.raises(ValueError, match="nothing to check"):
        bc.gradgradcheck(torch.sin, (x64(3),), check_fwd_over_rev=False, check_rev_over_rev=False)


def test_gradgradcheck_is_a_drop_in_that_catches_a_detached_backward() -> None:
    class Detached(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            (x,) = ctx.saved_tensors
            return 2 * x.detach() * grad

    assert bc.gradgradcheck(torch.tanh, (x64(4),))
    assert bc.gradcheck(Detached.apply, (x64(4),))
    with pytest.raises(bc.GradcheckError, match=r"Detached \(order 2\).*autograd is the odd one out"):
        bc.gradgradcheck(Detached.apply, (x64(4),))
    with pytest.warns(UserWarning, match="grad_outputs="):
        assert bc.gradgradcheck(torch.tanh, (x64(4),), grad_outputs=(x64(4, seed=1),))


def test_options_at_torchs_defaults_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bc.gradcheck(torch.sin, (x64(3),), check_forward_ad=False, check_backward_ad=True, fast_mode=True)


def test_an_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        bc.gradcheck(torch.sin, (x64(3),), epsilon=1e-3)


def test_atol_and_rtol_loosen_the_tolerance_when_given() -> None:
    class Off(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad * 2 * (1 + 1e-5)

    assert not bc.gradcheck(Off.apply, (x64(3),), raise_exception=False)
    assert bc.gradcheck(Off.apply, (x64(3),), rtol=1e-3)


def test_nondet_tol_is_honoured() -> None:
    assert not bc.gradcheck(FUNCTIONS.Drifting.apply, (x64(3, 4),), raise_exception=False)
    assert bc.gradcheck(FUNCTIONS.Drifting.apply, (x64(3, 4),), nondet_tol=1e-9)


def test_check_undefined_grad_and_check_batched_grad_switch_their_checks() -> None:
    args = (x64(3, 4), x64(4, seed=1))
    assert not bc.gradcheck(FUNCTIONS.NoneUnsafe.apply, args, raise_exception=False)
    assert bc.gradcheck(FUNCTIONS.NoneUnsafe.apply, args, check_undefined_grad=False)
    assert bc.gradcheck(FUNCTIONS.WrongRule.apply, (x64(4),))  # vmap is off by default, as in torch
    assert not bc.gradcheck(FUNCTIONS.WrongRule.apply, (x64(4),), check_batched_grad=True, raise_exception=False)


def test_fast_mode_still_finds_a_wrong_element_of_a_large_input() -> None:
    class OneWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            g = grad * torch.cos(x)
            g.view(-1)[777] *= 1.001
            return g

    with pytest.raises(bc.GradcheckError, match=r"x\[12, 57\]"):  # 777 = 12·60 + 57
        bc.gradcheck(OneWrong.apply, (x64(50, 60),), fast_mode=True)


def test_the_time_limit_message_names_gradchecks_keyword_not_the_cli_option() -> None:
    import time

    from backprop_check import CaseError, gradcheck

    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x.sin()

    with pytest.raises(CaseError) as raised:
        gradcheck(slow, (torch.randn(3, dtype=torch.float64),), timeout=0.2)
    assert "ran past its time limit of 0.2s (timeout= of gradcheck()" in str(raised.value)
    assert "--timeout" not in str(raised.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the device is checked")
def test_a_device_asked_for_and_missing_is_no_true() -> None:
    # check() exits 5 there; the drop-in used to answer True for a backward it never ran.
    with pytest.raises(bc.CaseError, match="nothing was checked on cuda: CUDA is not available"):
        bc.gradcheck(FUNCTIONS.WrongInput.apply, (x64(3, 4), x64(4, seed=1)), devices=["cuda"])
    with pytest.raises(bc.CaseError, match="nothing was checked on cuda"):
        bc.gradgradcheck(torch.sin, (x64(3),), devices=["cuda"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_check_takes_allow_skip_as_run_does() -> None:
    x = x64(3)
    assert bc.check(torch.tanh, (x,), devices=["cpu", "cuda"], points=0).exit_code == 5
    assert bc.check(torch.tanh, (x,), devices=["cpu", "cuda"], points=0, allow_skip=True).exit_code == 0


@pytest.mark.parametrize(
    "module, shape",
    [
        pytest.param(lambda: torch.nn.LayerNorm(3), (4, 3), id="layer-norm"),
        pytest.param(lambda: torch.nn.BatchNorm1d(3), (6, 3), id="batch-norm"),
        pytest.param(lambda: torch.nn.GroupNorm(2, 4), (2, 4, 3), id="group-norm"),
        pytest.param(lambda: torch.nn.Conv2d(2, 3, 3), (1, 2, 5, 5), id="conv-with-bias"),
        pytest.param(lambda: torch.nn.PReLU(), (4, 3), id="prelu"),
    ],
)
def test_a_float32_module_closed_over_is_promoted_for_the_float64_reference(module: Any, shape: tuple[int, ...]) -> None:
    """The kernels that name no dtype in their error (norms: "mixed dtype (CPU)…", conv: "Input
    type (double) and bias type (float)…", prelu: "Type promoting not supported") were one
    error line advising reference=; the module's float32 tensors are promoted as any others."""
    torch.manual_seed(0)
    m = module()
    x = torch.randn(*shape, requires_grad=True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = m(x)
        return out[0] if isinstance(out, tuple) else out

    assert bc.gradcheck(fn, (x,))


def test_a_module_that_checks_its_inputs_dtype_itself_is_told_to_run_in_float64() -> None:
    """nn.GRU compares its input's dtype with its weights' in Python, where no promotion of what
    its ops receive reaches: one line that says so, not the advice for a float32-only kernel."""
    gru = torch.nn.GRU(3, 2, batch_first=True)
    with pytest.raises(bc.CaseError, match=r"checks their dtypes itself: build it in float64 for the check \(module.double\(\)\)"):
        bc.gradcheck(lambda x: gru(x)[0], (torch.randn(2, 4, 3, requires_grad=True),))


def test_a_backward_meant_to_run_once_fails_repeatable_and_contract_leaves_it_out() -> None:
    class ScalesSaved(torch.autograd.Function):
        """A fused kernel's habit: the gradient is computed in the forward and scaled in place."""

        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            grad = 2 * x
            ctx.save_for_backward(grad)
            return (x * x).sum()

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            (grad,) = ctx.saved_tensors
            return grad.mul_(g)

    with pytest.raises(bc.GradcheckError, match=r"repeatable.*leave `repeatable` out of contract="):
        bc.gradcheck(ScalesSaved.apply, (x64(4),))
    from backprop_check.engine.contract import ITEMS

    items = [item for item in ITEMS if item not in ("repeatable", "vmap")]
    assert bc.gradcheck(ScalesSaved.apply, (x64(4),), contract=items)
