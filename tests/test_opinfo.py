"""The drop-in gradcheck against PyTorch's own operator suite: one unit of each fault class that
the conformance run over op_db found (benchmarks/opinfo.py), so that none comes back. Where a
hand-written function shows the class as well, it is used instead of op_db's sample."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import backprop_check as bc
from backprop_check import gradcheck
from backprop_check.commands.dropin import GradcheckError


def x64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# op_db is imported when this file is collected, before any test runs: an in-process pytest
# run (the plugin's tests) drops the modules it saw imported from sys.modules, and a second
# import of torch's test operators cannot register their library again.
try:
    import expecttest  # noqa: F401 - op_db's module needs it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.testing._internal.common_methods_invocations import op_db as _OPS
except ImportError:  # pragma: no cover - the dev extra installs it
    _OPS = None


@pytest.fixture(scope="session")
def op_db() -> dict[str, Any]:
    """op_db by name."""
    if _OPS is None:
        pytest.skip("expecttest is not installed (the dev extra has it)")
    return {f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name: op for op in _OPS}


def unit(op: Any, dtype: torch.dtype, index: int) -> tuple[Callable[..., Any], tuple[torch.Tensor, ...]]:
    """fn and its inputs for one op_db sample, as test_ops_gradients.py gives them to gradcheck:
    the inputs that require grad are differentiated, the rest is closed over."""
    torch.manual_seed(0)
    samples = iter(op.sample_inputs("cpu", dtype, requires_grad=True))
    sample = next(s for i, s in enumerate(samples) if i == index)
    everything = [sample.input, *sample.args, *sample.kwargs.values()]
    inputs = tuple(x for x in everything if isinstance(x, torch.Tensor) and x.requires_grad)

    def take(value: Any, it: Iterator[torch.Tensor]) -> Any:
        return next(it) if isinstance(value, torch.Tensor) and value.requires_grad else value

    def fn(*xs: torch.Tensor) -> Any:
        it = iter(xs)
        first = take(sample.input, it)
        args = [take(a, it) for a in sample.args]
        kwargs = {k: take(v, it) for k, v in sample.kwargs.items()}
        out = op.gradcheck_wrapper(op.get_op(), first, *args, **kwargs)
        return sample.output_process_fn_grad(out) if sample.output_process_fn_grad is not None else out

    return fn, inputs


def slipped(fn: Callable[..., torch.Tensor], factor: float, element: int = 0) -> Callable[..., torch.Tensor]:
    """fn behind a Function whose backward is autograd's VJP with one element of the first
    input's gradient multiplied by `factor`."""

    class Slip(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *xs: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(*xs)
            return fn(*xs).clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
            xs = [x.detach().requires_grad_(True) for x in ctx.saved_tensors]
            with torch.enable_grad():
                grads = list(torch.autograd.grad(fn(*xs), xs, grad))
            grads[0] = grads[0].clone(memory_format=torch.contiguous_format)  # reshape(-1) must be a view
            grads[0].reshape(-1)[element] *= factor
            return tuple(grads)

    return lambda *xs: Slip.apply(*xs)


def notes(report: bc.Report) -> str:
    return " | ".join(note for result in report.results for note in result.notes)


# --- what torch passes, the drop-in passes ---------------------------------------------------


def test_empty_inputs_pass_the_drop_in_while_check_says_nothing_was_checked() -> None:
    empty = torch.empty(1, 0, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(torch.sin, (empty,)) is True
    report = bc.check(torch.sin, (empty,), dtypes=["float64"], points=0)
    assert report.exit_code == 2 and "every parameter is empty" in report.results[0].message


def test_an_empty_output_in_forward_mode_is_nothing_to_compare_and_the_other_outputs_are_checked() -> None:
    # op_db's mm sample 1, (0, 5) @ (5, 10): forward mode was an internal error where torch passes.
    empty, b, c = torch.empty(0, 5, dtype=torch.float64, requires_grad=True), x64(5, 10).requires_grad_(), x64(3, seed=1)
    assert gradcheck(torch.mm, (empty, b), check_forward_ad=True, check_backward_ad=False)
    report = bc.check(torch.mm, (empty, b), modes=("fwd",), dtypes=["float64"], points=0)
    assert report.exit_code == 0 and "every output is empty" in report.results[0].message

    class WrongJvp(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return x.sin()

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.save_for_forward(*inputs)

        @staticmethod
        def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            return t * ctx.saved_tensors[0].cos() * 1.0001

    def both(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.mm(a, b), WrongJvp.apply(c)

    with pytest.raises(GradcheckError, match="output 1"):
        gradcheck(both, (empty, b, c.requires_grad_()), check_forward_ad=True, check_backward_ad=False)


def test_outputs_autograd_declares_non_differentiable_are_left_out_with_a_note() -> None:
    def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.native_layer_norm(x, (3,), w, b, 1e-5)  # output, saved mean, saved rstd

    inputs = (x64(2, 3).requires_grad_(), x64(3, seed=1).requires_grad_(), x64(3, seed=2).requires_grad_())
    assert gradcheck(layer_norm, inputs)
    report = bc.check(layer_norm, inputs, dtypes=["float64"], points=0)
    assert report.exit_code == 0
    assert "outputs 1, 2 are left out: autograd declares them non-differentiable" in notes(report)


def test_a_function_closing_over_float32_tensors_gets_a_verdict_from_a_promoted_float64_run() -> None:
    running_mean, running_var = torch.zeros(3), torch.ones(3)  # float32, closed over

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, running_mean, running_var, w, training=False)

    x, w = torch.randn(4, 3).requires_grad_(), torch.rand(3).add(0.5).requires_grad_()
    assert gradcheck(norm, (x, w))
    report = bc.check(norm, (x, w), dtypes=["float32"], points=0)
    assert report.exit_code == 0 and "promoted to float64" in notes(report)
    scale = running_var.add(1e-5).rsqrt()

    def wrong(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad * w * scale, (grad * x * scale).sum(0) * 1.01  # the weight's gradient 1 % off

    wrong_vjp = bc.check(norm, (x, w), manual=wrong, dtypes=["float32"], points=0)
    assert (wrong_vjp.results[0].verdict, wrong_vjp.results[0].culprit) == ("mismatch", "manual")


def test_a_function_closing_over_float64_tensors_is_checked_in_float32_with_them_rounded() -> None:
    # check()'s default dtypes are float64 and float32; a weight made in float64 met float32
    # inputs in the float32 run, and the case was an error (exit 2). Now every float64 tensor an
    # op receives is rounded to the run's dtype, with a note, and a manual VJP that closes over
    # the weight runs the same way: a slip in it is still found.
    weight = x64(6, 8, seed=3)

    def linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    x = x64(4, 8)
    report = bc.check(linear, (x,), points=1)
    assert report.exit_code == 0, [r.message for r in report.results]
    (single,) = [r for r in report.results if r.dtype == "float32"]
    assert any("rounded to the run's dtype" in note for note in single.notes)

    def wrong(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return grad @ (weight * 1.01)

    slipped = bc.check(linear, (x,), manual=wrong, points=1)
    assert [(r.dtype, str(r.verdict), str(r.culprit)) for r in slipped.results] == [
        ("float64", "mismatch", "manual"), ("float32", "mismatch", "manual")]


def test_a_zero_tensor_gradient_is_read_as_zeros() -> None:
    assert gradcheck(torch.sgn, (x64(4, 4).requires_grad_(),))  # its backward returns a ZeroTensor


def test_infinite_input_elements_are_held_fixed_and_said_so() -> None:
    x = x64(3, 4)
    x[0, 1] = x[2, 0] = -torch.inf  # an attention mask

    def safe_softmax(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._safe_softmax.default(x, -1)

    assert gradcheck(safe_softmax, (x.requires_grad_(),))
    report = bc.check(safe_softmax, (x,), dtypes=["float64"], points=0)
    assert report.exit_code == 0 and "2 of `x`: inf or nan" in notes(report)
    with pytest.raises(GradcheckError):  # the finite elements are still checked
        gradcheck(slipped(safe_softmax, 1.0001, element=5), (x,))


@pytest.mark.parametrize(
    ("fn", "x"),
    [
        pytest.param(lambda x: torch.sort(x).values, torch.tensor([1.0, 3.0, 1.0, 2.0, 3.0], dtype=torch.float64), id="sort-with-ties"),
        pytest.param(lambda x: x.view(2, 6), x64(3, 4), id="view-refuses-a-layout"),
        pytest.param(lambda x: torch.as_strided(x, (2, 2), (1, 2), 1), x64(3, 3), id="as_strided-reads-strides"),
    ],
)
def test_the_layout_item_compares_the_same_values_where_the_forward_agrees(fn: Callable[..., Any], x: torch.Tensor) -> None:
    report = bc.check(fn, (x,), dtypes=["float64"], points=0, contract=("layout",))
    assert report.exit_code == 0, report.results[0].message


def test_a_float32_gradient_that_underflows_is_not_a_false_alarm(op_db: dict[str, Any]) -> None:
    fn, inputs = unit(op_db["prod"], torch.float32, 0)  # 125 numbers: the gradient is 2e-56, 0 in float32
    assert gradcheck(fn, inputs)


def test_a_float32_gradient_that_underflows_along_a_direction_is_not_a_false_alarm() -> None:
    # A product of 8 numbers of 1e-6 in each row: every gradient element is ~1e-43, 0 in float32,
    # where the directional check judged it (4x8 elements: a direction's allowance had no
    # underflow floor; a function of a weight of 1e6 met it at a standard normal random point).
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-6
    report = bc.check(lambda x: x.prod(-1), (x,), dtypes=["float32"], points=0)
    assert report.exit_code == 0, report.results[0].message


@pytest.mark.parametrize(("name", "index"), [("logcumsumexp", 0), ("pca_lowrank", 1)])
def test_float64s_own_rounding_far_from_zero_or_ill_conditioned_is_no_false_alarm(
    op_db: dict[str, Any], name: str, index: int
) -> None:
    # logcumsumexp of values 1e4: a derivative of order 2 that is 0 in truth comes out 9e-13
    # (x − max errs by an ulp of 1e4); pca_lowrank's order 2 moves by 4e-9 between points one
    # ulp apart. Torch's gradgradcheck passes both; rounding.float64_allowances.
    fn, inputs = unit(op_db[name], torch.complex128, index)
    assert bc.gradgradcheck(fn, inputs)


def test_a_slip_of_1e_6_far_from_zero_is_still_caught_in_float64() -> None:
    # The float64 rounding allowance there is ~1e-11 of the gradient: a slip a hundred thousand
    # times larger still fails, and is still said to be the manual gradient's.
    x = 1e4 + x64(6)
    slip = slipped(lambda t: torch.logsumexp(t, 0), 1 + 1e-6, element=2)
    with pytest.raises(GradcheckError) as failure:
        gradcheck(slip, (x.requires_grad_(),))
    assert "input0[2]" in str(failure.value)


# --- what must never pass --------------------------------------------------------------------


def test_as_strided_scatter_whose_derivative_is_wrong_does_not_pass(op_db: dict[str, Any]) -> None:
    fn, inputs = unit(op_db["as_strided_scatter"], torch.float64, 0)
    with pytest.raises(GradcheckError, match="autograd is the odd one out"):
        gradcheck(fn, inputs)


@pytest.mark.parametrize("factor", [1.01, 1.0001, -1.0])
def test_a_slip_in_a_function_reading_storage_through_strides_is_caught(factor: float) -> None:
    """The finite differences ran fn on slices of one shared buffer: as_strided read the
    neighbouring tensors' values, the estimates were garbage, and every slip passed."""
    as_strided = slipped(lambda x: torch.as_strided(x, (2, 2), (1, 2), 1), factor, element=4)
    with pytest.raises(GradcheckError):
        gradcheck(as_strided, (x64(3, 3).requires_grad_(),))


def test_torchs_default_mode_is_bounded_and_still_catches_one_element_off_by_1e_4() -> None:
    x = x64(64, 80).requires_grad_()  # above FULL_UP_TO: the default mode, not every element
    with pytest.raises(GradcheckError):
        gradcheck(slipped(torch.tanh, 1.0001, element=1234), (x,))


# --- real kernels' backwards -----------------------------------------------------------------


class EditsWhatItSaved(torch.autograd.Function):
    """Softmax whose backward reuses the probabilities it saved on ctx as its output buffer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        probs = x.softmax(-1)
        ctx.probs = probs.clone()
        return probs

    @staticmethod
    @torch.no_grad()
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        probs = ctx.probs
        return probs.mul_(grad - (grad * probs).sum(-1, keepdim=True))


class OncePerGraph(torch.autograd.Function):
    """The same with save_for_backward: a second backward on one graph raises."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        probs = x.softmax(-1)
        ctx.save_for_backward(probs.clone())
        return probs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        return probs.mul_(grad - (grad * probs).sum(-1, keepdim=True))


def test_a_backward_that_edits_what_it_saved_is_said_to_do_so() -> None:
    report = bc.check(EditsWhatItSaved.apply, (x64(3, 5),), dtypes=["float64"], points=0)
    (result,) = report.results
    found = {c.name: c for c in result.checks if c.kind == "contract"}
    assert found["repeatable"].verdict == "mismatch" and "changes what it saved" in found["repeatable"].note
    assert all(c.verdict == "ok" for name, c in found.items() if name != "repeatable"), result.message
    assert "_contextlib" not in result.message and all("_contextlib" not in h for h in result.hints)
    assert any("test_opinfo.py" in h for h in result.hints)


def test_a_backward_that_runs_once_per_graph_gets_a_verdict_on_every_item() -> None:
    report = bc.check(OncePerGraph.apply, (x64(3, 5),), dtypes=["float64"], points=0)
    (result,) = report.results
    assert result.verdict == "mismatch"
    found = {c.name: c for c in result.checks if c.kind == "contract"}
    assert "can run only once per graph" in found["repeatable"].note
    assert all(c.verdict == "ok" for name, c in found.items() if name != "repeatable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA rows run here")
def test_a_time_limit_on_the_cpu_leaves_the_cuda_rows_skipped() -> None:
    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)
        return x.sin()

    report = bc.check(slow, (x64(3),), devices=["cpu", "cuda"], dtypes=["float64"], points=0, timeout=0.1)
    verdicts = {r.device: r.verdict for r in report.results}
    assert verdicts == {"cpu": "error", "cuda": "skipped"}
