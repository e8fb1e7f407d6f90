"""Complex values: torch's convention, case files and function mode, names, hints, errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import backprop_check as bc
from backprop_check import case, node, run
from backprop_check.commands.cli import main
from backprop_check.formats import text
from backprop_check.model.points import given_point, random_point

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "complex_conj.py"
Z = [0.3 + 1.2j, -0.5 + 0.1j, 1.0 - 0.7j]
C = [1.0 - 2.0j, 0.5 + 0.5j, -0.2 + 1.0j]


def cz(values: list[complex] = Z) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.complex128)


def crandn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(seed))


def square_function(conj: bool) -> type[torch.autograd.Function]:
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(z)
            return z * z

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (z,) = ctx.saved_tensors
            return g * (2 * z).conj() if conj else g * 2 * z

    return Square


Square, ForgotConj = square_function(conj=True), square_function(conj=False)


def power_case(manual: Any = None, square: Any = None) -> bc.Case:
    """L = Re(conj(c)·z²): torch's gradient is conj(f'(z)) = 2·c·conj(z)."""

    @case(params={"z": Z}, data={"c": C}, name="power")
    def power(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        squared = square.apply(z) if square is not None else z * z
        return (c.conj() * squared).real.sum()

    if manual is not None:
        power.manual(manual)
    return power


def right(z: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"z": 2 * c * z.conj()}


def check_one(target: Any, **options: Any) -> bc.Result:
    options.setdefault("devices", ["cpu"])
    options.setdefault("dtypes", ["float64"])
    return run([target], **options).results[0]


# --- torch's convention, which the design rests on ------------------------------------------


def test_the_gradient_of_the_real_view_is_the_real_view_of_torchs_complex_gradient() -> None:
    z = cz().requires_grad_()
    loss = (z.abs() ** 2 + (z * z).imag).sum()
    (complex_grad,) = torch.autograd.grad(loss, z)
    view = torch.view_as_real(cz()).clone().requires_grad_()
    (view_grad,) = torch.autograd.grad((torch.view_as_complex(view).abs() ** 2 + (torch.view_as_complex(view) ** 2).imag).sum(), view)
    assert torch.allclose(view_grad, torch.view_as_real(complex_grad))
    assert torch.allclose(complex_grad, 2 * z.detach() + 2 * z.detach().conj() * 1j)  # dL/dx + i·dL/dy


def test_a_complex_cotangent_is_the_gradient_of_the_loss_re_conj_v_times_the_output() -> None:
    z = cz().requires_grad_()
    v = torch.tensor([0.4 - 1.0j, 2.0 + 0.3j, -0.7 + 0.2j], dtype=torch.complex128)
    out = torch.exp(z) * z
    (vjp,) = torch.autograd.grad(out, z, v, retain_graph=True)
    (from_loss,) = torch.autograd.grad((v.conj() * out).real.sum(), z)
    assert torch.allclose(vjp, from_loss)


# --- case files --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_right_complex_gradient_is_ok_at_the_given_and_random_points(dtype: str) -> None:
    result = check_one(power_case(right, Square), dtypes=[dtype], points=3)
    assert (result.verdict, result.points) == ("ok", 4), result.message


def test_a_custom_backward_that_forgets_the_conjugate_is_autograds_fault_at_a_named_element() -> None:
    result = check_one(power_case(right, ForgotConj), points=1)
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "dloss/dz[0].real" in result.message
    assert any("Square" in hint and ".backward" in hint for hint in result.hints)


def test_a_two_way_case_catches_the_forgotten_conjugate_too() -> None:
    result = check_one(power_case(None, ForgotConj), dtypes=["float32"], points=1)
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")


def test_a_manual_gradient_that_is_not_conjugated_is_the_culprit_with_the_conjugate_hint() -> None:
    result = check_one(power_case(lambda z, c: {"z": 2 * c.conj() * z}), points=1)
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert "dloss/dz[0].imag" in result.message  # the real parts agree: x·Re and the conjugate share them
    (hint,) = result.hints
    assert "complex conjugate of the true gradient" in hint and "dL/dx + i·dL/dy" in hint


def test_a_manual_gradient_without_torchs_factor_2_names_the_convention_in_its_factor_hint() -> None:
    result = check_one(power_case(lambda z, c: {"z": c * z.conj()}), points=1)
    assert result.culprit == "manual"
    assert any("half the true gradient: ∂L/∂z̄ without torch's factor 2" in hint for hint in result.hints)


def test_the_wirtinger_derivative_of_the_other_convention_is_named() -> None:
    result = check_one(power_case(lambda z, c: {"z": c.conj() * z}), points=1)
    assert result.culprit == "manual"
    assert any("half the conjugate of the true gradient: ∂L/∂z" in hint for hint in result.hints)


def test_complex_data_and_a_published_complex_gradient_are_checked() -> None:
    @case(params={"z": Z}, expect={"z": [2 * z for z in Z]})  # |z|²: dL/dx + i·dL/dy = 2z
    def norm(z: torch.Tensor) -> torch.Tensor:
        return (z.abs() ** 2).sum()

    @case(params={"z": Z}, expect={"z": [2 * z.conjugate() for z in Z]})
    def published_conjugate(z: torch.Tensor) -> torch.Tensor:
        return (z.abs() ** 2).sum()

    assert check_one(norm, points=1).verdict == "ok"
    wrong = check_one(published_conjugate, points=1)
    assert wrong.verdict == "mismatch"
    assert "expected z[0].imag = -2.4, the case gives 2.4" in wrong.message


def test_random_points_redraw_the_real_and_the_imaginary_parts() -> None:
    checked = power_case(right)
    given = given_point(checked, 0)
    assert given.complex == {"z", "c"}
    assert tuple(given.params["z"].shape) == (3, 2)  # the real view
    assert torch.equal(given.params["z"][:, 1], torch.tensor([1.2, 0.1, -0.7], dtype=torch.float64))
    first, second = (random_point(checked, given, i, 0) for i in (1, 2))
    for point in (first, second):
        assert point.complex == given.complex
        for name in ("z", "c"):
            value = {**point.params, **point.data}[name]
            assert value.shape == (3, 2) and bool((value[:, 0] != 0).all()) and bool((value[:, 1] != 0).all())
    assert not torch.equal(first.params["z"], second.params["z"])


def test_the_forward_and_the_manual_gradient_receive_complex_tensors_in_the_runs_precision() -> None:
    seen: set[torch.dtype] = set()

    @case(params={"z": Z})
    def spy(z: torch.Tensor) -> torch.Tensor:
        seen.add(z.dtype)
        return (z.abs() ** 2).sum()

    @spy.manual
    def spy_manual(z: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.add(z.dtype)
        return {"z": 2 * z}

    results = run([spy], devices=["cpu"], dtypes=["float64", "float32"], points=1).results
    assert [r.verdict for r in results] == ["ok", "ok"]
    assert seen == {torch.complex128, torch.complex64}


# --- names in the reports ------------------------------------------------------------------


def test_an_element_of_a_complex_tensor_is_named_by_its_part_in_text_and_json() -> None:
    report = run([power_case(right, ForgotConj)], devices=["cpu"], dtypes=["float64"], points=0)
    assert "z[0].real" in text.render(report)
    check = report.to_dict()["results"][0]["checks"][0]
    assert (check["name"], check["shape"], check["index"], check["complex"], check["part"]) == ("z", [3], [0], True, "real")


def test_a_real_tensor_keeps_its_plain_index() -> None:
    @case(params={"w": [[1.0, 2.0], [3.0, 4.0]]})
    def quad(w: torch.Tensor) -> torch.Tensor:
        return (w**2).sum()

    quad.manual(lambda w: {"w": 2 * w * torch.tensor([[1.0, 1.0], [1.0, 3.0]], dtype=w.dtype)})
    report = run([quad], devices=["cpu"], dtypes=["float64"], points=0)
    check = report.to_dict()["results"][0]["checks"][0]
    assert (check["index"], check["complex"], check["part"]) == ([1, 1], False, None)
    assert "w[1, 1]" in report.results[0].message


def test_the_example_case_file_reports_both_forgotten_conjugates(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code = main(["run", str(EXAMPLE), "--device", "cpu", "--dtype", "float64", "--points", "1", "--format", "json", "--output", str(out)])
    assert code == 1
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert (results["square_backward"]["culprit"], results["power_manual"]["culprit"]) == ("autograd", "manual")
    assert "dloss/dz[0].real" in results["square_backward"]["message"]
    assert any("complex conjugate" in hint for hint in results["power_manual"]["hints"])


# --- function mode -----------------------------------------------------------------------


def test_function_mode_checks_a_complex_custom_function_and_catches_the_forgotten_conjugate() -> None:
    good = bc.check(Square.apply, (cz().requires_grad_(),), points=2)
    assert [r.verdict for r in good.results] == ["ok", "ok"]  # float64 and float32
    bad = bc.check(ForgotConj.apply, (cz().requires_grad_(),), dtypes=["float64"], points=1).results[0]
    assert (bad.verdict, bad.culprit) == ("mismatch", "autograd")
    assert "output 0 → z" in bad.message and "z[" in bad.message and (".real" in bad.message or ".imag" in bad.message)
    # the output is complex, so a random complex v hides the pattern: a real one shows it
    assert any("with a real grad_output the autograd dloss/dz is the complex conjugate" in h for h in bad.hints), bad.hints


def test_function_mode_mixes_complex_and_real_inputs_and_real_outputs() -> None:
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    report = bc.check(lambda z, w: (z * w).abs(), (cz().requires_grad_(), w), points=2)
    assert [r.verdict for r in report.results] == ["ok", "ok"]
    names = {c.name: c.complex for c in report.results[0].checks if c.kind == "param"}
    assert names == {"z": True, "w": False}


def test_function_mode_checks_complex_outputs_of_real_inputs_through_complex_cotangents() -> None:
    x = torch.tensor([0.2, -0.4, 1.1], dtype=torch.float64)
    assert bc.check(lambda x: torch.exp(1j * x) * x, (x,), points=2).exit_code == 0

    class Phase(torch.autograd.Function):  # y = e^{ix}; the true backward is Re(g·conj(i·y))
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            y = torch.exp(1j * x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (y,) = ctx.saved_tensors
            return (g * 1j * y).real  # BUG: i·y not conjugated

    assert bc.check(lambda x: torch.exp(1j * x), (x,), dtypes=["float64"], points=1).exit_code == 0

    bad = bc.check(Phase.apply, (x,), dtypes=["float64"], points=1).results[0]
    assert (bad.verdict, bad.culprit) == ("mismatch", "autograd")


def test_a_manual_vjp_receives_complex_grad_outputs_and_is_checked_against_torchs_convention() -> None:
    received: list[torch.dtype] = []

    def vjp(g: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor]:
        received.append(g.dtype)
        return (g * (2 * z).conj(),)

    good = bc.check(lambda z: z * z, (cz(),), manual=vjp, points=1)
    assert [r.verdict for r in good.results] == ["ok", "ok"]
    assert set(received) == {torch.complex128, torch.complex64}
    bad = bc.check(lambda z: z * z, (cz(),), manual=lambda g, z: (g * 2 * z,), dtypes=["float64"], points=1).results[0]
    assert (bad.verdict, bad.culprit) == ("mismatch", "manual")
    assert any("the manual VJP multiplies grad_output by f′(z)" in hint for hint in bad.hints), bad.hints
    # another slip (a factor) is not called a conjugate
    other = bc.check(lambda z: z * z, (cz(),), manual=lambda g, z: (g * z.conj(),), dtypes=["float64"], points=1).results[0]
    assert (other.verdict, other.culprit) == ("mismatch", "manual")
    assert not any("complex conjugate of the true one" in hint for hint in other.hints), other.hints


def test_the_custom_function_contract_runs_on_complex_tensors() -> None:
    report = bc.check(Square.apply, (cz(),), dtypes=["float64"], points=0)
    contract = {c.name: c.verdict for c in report.results[0].checks if c.kind == "contract"}
    assert contract and set(contract.values()) == {"ok"}, report.results[0].checks


def test_gradcheck_drop_in_takes_complex_inputs() -> None:
    assert bc.gradcheck(Square.apply, (cz().requires_grad_(),))
    with pytest.raises(RuntimeError, match="autograd"):
        bc.gradcheck(ForgotConj.apply, (cz().requires_grad_(),))


def test_gradcheck_drop_in_takes_conjugate_views_as_torchs_does() -> None:
    # op_db's dot, vdot and mm give an input as `z.conj()`, its conjugation a bit, not data: the
    # drop-in failed with an internal error on it where torch's gradcheck passes.
    a, b = crandn(4).requires_grad_(), crandn(4, seed=1).conj().requires_grad_()
    m, n = crandn(3, 4, seed=2).conj().requires_grad_(), crandn(4, 2, seed=3).requires_grad_()
    assert bc.gradcheck(torch.dot, (a, b)) and bc.gradcheck(torch.mm, (m, n))
    assert torch.autograd.gradcheck(torch.dot, (a, b))


class ConjPathSlip(torch.autograd.Function):
    """z², whose backward slips by 1 % only where its input is a conjugate view: a kernel with
    a separate path for conjugated operands."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.conjugated = z.is_conj()
        return z * z

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad * 2 * z.conj() * (1.01 if ctx.conjugated else 1.0)


@pytest.mark.parametrize("size", [4, 100])  # vmap's batches, and the replay's from 64 elements
def test_a_conjugate_view_reaches_fn_as_one_so_its_own_path_is_checked(size: int) -> None:
    seen = []

    def fn(z: torch.Tensor) -> torch.Tensor:
        seen.append(z.is_conj())
        return ConjPathSlip.apply(z)

    assert bc.gradcheck(fn, (crandn(size).requires_grad_(),))
    assert not any(seen)
    seen.clear()
    with pytest.raises(RuntimeError, match="autograd"):
        bc.gradcheck(fn, (crandn(size).conj().requires_grad_(),))
    assert True in seen  # (the replay records fn once on stand-ins that hold the values alone)
    assert not torch.autograd.gradcheck(fn, (crandn(size).conj().requires_grad_(),), raise_exception=False)


# --- bad input: one line each, the other results still run --------------------------------


def test_a_half_precision_run_cannot_hold_complex_values_and_says_so_per_result() -> None:
    results = run([power_case(right)], devices=["cpu"], dtypes=["float64", "float16", "bfloat16"], points=1).results
    assert [r.verdict for r in results] == ["ok", "error", "error"]
    for result in results[1:]:
        assert f"a {result.dtype} run cannot hold it" in result.message and "\n" not in result.message


def _numpy_complex() -> bc.Case:
    @case(params={"z": Z}, numpy=True)
    def numpy_complex(z: Any) -> Any:
        return float((abs(z) ** 2).sum())

    numpy_complex.manual(lambda z: {"z": 2 * z})
    return numpy_complex


def _real_manual() -> bc.Case:
    return power_case(lambda z, c: {"z": (2 * c * z.conj()).real})


def _complex_manual_for_a_real_parameter() -> bc.Case:
    @case(params={"x": [0.5, 1.0]})
    def phase(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(1j * x).real.sum()

    phase.manual(lambda x: {"x": -torch.sin(x) + 0j})
    return phase


def _sample_complex_for_a_real_parameter() -> bc.Case:
    @case(params={"x": [0.5, 1.0]}, sample=lambda g: {"x": torch.ones(2, dtype=torch.complex128)})
    def real_only(x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum()

    return real_only


def _complex_loss() -> bc.Case:
    @case(params={"z": Z})
    def complex_loss(z: torch.Tensor) -> torch.Tensor:
        return (z * z).sum()

    return complex_loss


def _complex_node() -> bc.Case:
    @case(params={"z": Z})
    def complex_node(z: torch.Tensor) -> torch.Tensor:
        return (node("h", z * z).abs() ** 2).sum()

    return complex_node


@pytest.mark.parametrize(
    ("build", "says"),
    [
        pytest.param(_numpy_complex, "'z' is complex, and a numpy=True case checks real values only", id="numpy-case"),
        pytest.param(_real_manual, "the manual gradient for 'z' is real (float64), but 'z' is complex", id="real-manual-gradient"),
        pytest.param(_complex_manual_for_a_real_parameter, "the manual gradient for 'x' is complex", id="complex-gradient-of-a-real-parameter"),
        pytest.param(_sample_complex_for_a_real_parameter, "sample= returns a complex 'x', but its given value is real", id="sample-turns-complex"),
        pytest.param(_complex_loss, "the loss must be real, got torch.complex128", id="complex-loss"),
        pytest.param(_complex_node, "node 'h' is complex", id="complex-node"),
    ],
)
def test_bad_complex_input_is_one_line_naming_the_case(build: Any, says: str) -> None:
    result = check_one(build(), points=1)
    assert result.verdict == "error"
    assert says in result.message, result.message
    assert "\n" not in result.message and "Traceback" not in result.message


def test_a_broken_complex_case_leaves_the_others_running() -> None:
    results = run([_complex_loss(), power_case(right)], devices=["cpu"], dtypes=["float64"], points=1).results
    assert [r.verdict for r in results] == ["error", "ok"]
