"""A check leaves every user object as written: an `@case` Case, a numpy case, a layer case and
a FunctionCase have the same attributes with the same values (tensors and arrays compared by
value) after `run(...)` as before it, in reverse mode, forward mode and at order 2 where the
case supports them; `check(fn, inputs)` leaves the user's inputs as they were given."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from backprop_check import case, check, function_case, layer, run

CPU = dict(devices=["cpu"], points=1)
BOTH = dict(CPU, dtypes=["float64", "float32"])
CPU64 = dict(CPU, dtypes=["float64"])

# --- a deep snapshot of what the user wrote ---------------------------------------------------------


def frozen(value: Any) -> Any:
    """`value` with every tensor and array copied by value and every container copied deeply;
    anything else (functions, numbers, strings) kept as it is, to be compared by identity."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.requires_grad, value.grad, value.detach().clone())
    if isinstance(value, np.ndarray):
        return ("array", value.dtype, value.copy())
    if isinstance(value, dict):
        return {"dict": {key: frozen(item) for key, item in value.items()}}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [frozen(item) for item in value]}
    return value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return isinstance(b, tuple) and b[0] == "tensor" and a[1:5] == b[1:5] and torch.equal(a[5], b[5])
    if isinstance(a, tuple) and a and a[0] == "array":
        return isinstance(b, tuple) and b[0] == "array" and a[1] == b[1] and np.array_equal(a[2], b[2])
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a is b or bool(a == b)


def snapshot(obj: Any) -> dict[str, Any]:
    return {name: frozen(value) for name, value in vars(obj).items()}


def changed(before: dict[str, Any], obj: Any) -> list[str]:
    """The attributes of `obj` added, removed or changed since `before`."""
    after = snapshot(obj)
    return sorted(name for name in before.keys() | after.keys() if name not in before or name not in after or not same(before[name], after[name]))


def checked(report: Any) -> None:
    """The check really ran: every result is a verdict on the gradient, none an error."""
    assert report.results
    assert all(result.verdict == "ok" for result in report.results), [r.message for r in report.results]


# --- the user's objects -------------------------------------------------------------------------------


def torch_case(**options: Any) -> Any:
    @case(params={"w": [0.5, -1.0, 0.2]}, data={"x": [1.0, 2.0, 3.0], "label": torch.tensor([0, 1, 1])}, **options)
    def weighted(w: torch.Tensor, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(w * x) * (label + 1)).sum()

    @weighted.manual
    def weighted_manual(w: torch.Tensor, x: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w": (1 - torch.tanh(w * x) ** 2) * x * (label + 1)}

    return weighted


def numpy_case() -> Any:
    @case(params={"w": np.array([0.5, -1.0])}, data={"x": [1.0, 2.0], "label": np.array([0, 1])}, numpy=True)
    def labelled(w: np.ndarray, x: np.ndarray, label: np.ndarray) -> float:
        return float(np.sum(np.sin(w * x) * (label + 1)))

    labelled.manual(lambda w, x, label: {"w": np.cos(w * x) * x * (label + 1)})
    return labelled


def affine_forward(x: Any, w: Any, b: Any) -> tuple[Any, Any]:
    return x @ w + b, (x, w)


def affine_backward(dout: Any, cache: Any) -> tuple[Any, Any, Any]:
    x, w = cache
    return dout @ w.T, x.T @ dout, dout.sum(axis=0) if isinstance(dout, np.ndarray) else dout.sum(dim=0)


def numpy_layer() -> Any:
    rng = np.random.default_rng(3)
    return layer(affine_forward, affine_backward, (rng.standard_normal((2, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)))


def torch_layer() -> Any:
    gen = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((2, 3), (3, 2), (2,)))
    return layer(affine_forward, affine_backward, (x, w, b))


def softplus(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x) * y


def softplus_vjp(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grad * torch.sigmoid(x) * y, grad * torch.nn.functional.softplus(x)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)


def a_function_case(**options: Any) -> Any:
    return function_case(softplus, inputs=inputs(), manual=softplus_vjp, **options)


# --- an @case Case and a numpy case ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, plan",
    [
        pytest.param({}, BOTH, id="reverse-mode"),
        pytest.param({"modes": ("fwd",)}, CPU64, id="forward-mode"),
        pytest.param({"modes": ("rev", "fwd")}, BOTH, id="both-modes"),
        pytest.param({"order": 2}, CPU64, id="order-2"),
    ],
)
def test_a_check_leaves_an_at_case_case_as_written(options: dict[str, Any], plan: dict[str, Any]) -> None:
    weighted = torch_case(**options)
    before = snapshot(weighted)
    checked(run(weighted, **plan))
    assert changed(before, weighted) == []


def test_a_check_leaves_a_numpy_case_as_written() -> None:
    labelled = numpy_case()
    before = snapshot(labelled)
    checked(run(labelled, **BOTH))
    assert changed(before, labelled) == []


# --- layer cases -------------------------------------------------------------------------------------


@pytest.mark.parametrize("built", [pytest.param(numpy_layer, id="numpy-layer"), pytest.param(torch_layer, id="torch-layer")])
def test_a_check_leaves_a_layer_case_as_written(built: Any) -> None:
    affine = built()
    before = snapshot(affine)
    checked(run(affine, **BOTH))
    assert changed(before, affine) == []


# --- a FunctionCase ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, plan",
    [
        pytest.param({}, BOTH, id="reverse-mode"),
        pytest.param({"modes": ("fwd",)}, CPU64, id="forward-mode"),
        pytest.param({"order": 2}, CPU64, id="order-2"),
    ],
)
def test_a_check_leaves_a_function_case_as_written(options: dict[str, Any], plan: dict[str, Any]) -> None:
    softplus_case = a_function_case(**options)
    before = snapshot(softplus_case)
    checked(run(softplus_case, **plan))
    assert changed(before, softplus_case) == []


def test_asking_a_function_case_its_problem_leaves_it_as_written() -> None:
    """Asking a FunctionCase why it cannot be checked learns its outputs on a copy (`prepared`):
    neither the question nor the run changes the case."""
    softplus_case = a_function_case()
    before = snapshot(softplus_case)
    assert softplus_case.problem() is None
    assert changed(before, softplus_case) == []
    after_problem = snapshot(softplus_case)
    checked(run(softplus_case, **BOTH))
    assert changed(after_problem, softplus_case) == []


# --- check(fn, inputs): the user's inputs --------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [pytest.param({}, id="reverse-mode"), pytest.param({"modes": ("fwd",)}, id="forward-mode"), pytest.param({"order": 2}, id="order-2")],
)
def test_check_leaves_the_users_inputs_as_given(options: dict[str, Any]) -> None:
    x, y = inputs()
    x.requires_grad_(True)
    given = (x, y)
    before = frozen(given)
    checked(check(softplus, given, manual=softplus_vjp, **CPU64, **options))
    assert same(before, frozen(given))
    assert x.grad is None and y.grad is None


def test_check_leaves_a_dict_of_inputs_as_given() -> None:
    x, y = inputs()
    given = {"x": x, "y": y}
    before = frozen(given)
    checked(check(softplus, given, manual=softplus_vjp, **BOTH))
    assert same(before, frozen(given))


# --- a module case ------------------------------------------------------------------------------------


class Scaled(torch.nn.Module):
    """A module whose buffer is drawn at build time, besides its parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.register_buffer("shift", torch.randn(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.sin(self.weight * x + self.shift) ** 2).sum()


@pytest.mark.parametrize(
    "options, plan",
    [
        pytest.param({}, BOTH, id="reverse-mode"),
        pytest.param({"modes": ("fwd",)}, CPU64, id="forward-mode"),
        pytest.param({"order": 2}, CPU64, id="order-2"),
    ],
)
def test_a_check_leaves_a_module_case_as_written(options: dict[str, Any], plan: dict[str, Any]) -> None:
    @case(module=Scaled, data={"x": [1.0, 2.0, 3.0]}, **options)
    def scaled(model: Scaled, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    before = snapshot(scaled)
    checked(run(scaled, **plan))
    assert changed(before, scaled) == []
