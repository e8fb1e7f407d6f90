"""Where a derivation breaks: a wrong local gradient is located at exactly its node."""
from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from backprop_check import case, node, run
from backprop_check.formats import FORMATS

CPU64 = dict(devices=["cpu"], dtypes=["float64"], points=1)
WRONG = 1.5  # a planted local gradient is off by this factor


def chain_case(wrong: str | None) -> Any:
    """x → a = 3x → b = sin(a) → c = b² → loss = Σ 2c, with one local gradient planted wrong:
    "c" is dloss/dc, "b" is dc/db, "a" is db/da and "x" is da/dx."""

    @case(params={"x": [0.3, -0.7, 1.1]}, name=f"chain_wrong_{wrong}")
    def chain(x: torch.Tensor) -> torch.Tensor:
        a = node("a", 3 * x)
        b = node("b", torch.sin(a))
        c = node("c", b**2)
        return (2 * c).sum()

    @chain.manual
    def chain_manual(x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = 3 * x
        b = torch.sin(a)
        factor = {name: WRONG if name == wrong else 1.0 for name in "cbax"}
        dloss_dc = 2 * torch.ones_like(x) * factor["c"]
        dc_db = 2 * b * factor["b"]
        db_da = torch.cos(a) * factor["a"]
        da_dx = 3 * factor["x"]
        dloss_db = dloss_dc * dc_db
        dloss_da = dloss_db * db_da
        return {"x": dloss_da * da_dx, "a": dloss_da, "b": dloss_db, "c": dloss_dc}

    return chain


def only(report: Any) -> Any:
    (result,) = report.results
    return result


@pytest.mark.parametrize(
    ("wrong", "node_name", "step"),
    [
        pytest.param("c", "c", "in the first step back from the loss (dloss/dc)", id="wrong-dloss/dc-is-found-at-c"),
        pytest.param("b", "b", "dloss/dc agrees, dloss/db does not, so the slip is in the step dc/db", id="wrong-dc/db-is-found-at-b"),
        pytest.param("a", "a", "dloss/db agrees, dloss/da does not, so the slip is in the step db/da", id="wrong-db/da-is-found-at-a"),
    ],
)
def test_a_wrong_local_gradient_is_located_at_its_node(wrong: str, node_name: str, step: str) -> None:
    result = only(run(chain_case(wrong), **CPU64))
    assert (result.verdict, result.culprit) == ("mismatch", "manual")
    assert result.first_bad_node == node_name
    assert f"the derivation first goes wrong at node {node_name!r}" in result.message
    assert step in result.message


def test_a_wrong_last_step_is_placed_between_the_last_good_node_and_the_parameter() -> None:
    result = only(run(chain_case("x"), **CPU64))
    assert (result.verdict, result.culprit, result.first_bad_node) == ("mismatch", "manual", None)
    assert "every node the manual gradient gives agrees (c, b, a)" in result.message
    assert "the slip is in the last step, between node 'a' and parameter 'x' (da/dx)" in result.message


def test_the_chain_with_no_planted_slip_agrees() -> None:
    result = only(run(chain_case(None), **CPU64))
    assert (result.verdict, result.first_bad_node) == ("ok", None)


def branch_case(wrong: str) -> Any:
    """h = W1·x; ŷ = W2·h + b2; loss = (ŷ − y)²: W2 feeds ŷ directly, W1 through h."""

    @case(
        params={"W1": [[0.5, -1.0], [1.5, 0.25]], "W2": [[1.0, -2.0]], "b2": [0.5]},
        data={"x": [[1.0], [2.0]], "y": [[3.0]]},
        name=f"branch_wrong_{wrong}",
    )
    def branch(W1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = node("h", W1 @ x)
        y_hat = node("y_hat", W2 @ h + b2)
        return ((y_hat - y) ** 2).sum()

    @branch.manual
    def branch_manual(W1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        h = W1 @ x
        dloss_dyhat = 2 * (W2 @ h + b2 - y)
        dloss_dh = W2.T @ dloss_dyhat
        grads = {"W1": dloss_dh @ x.T, "W2": dloss_dyhat @ h.T, "b2": dloss_dyhat.reshape(1), "h": dloss_dh, "y_hat": dloss_dyhat}
        grads[wrong] = grads[wrong] * WRONG
        return grads

    return branch


@pytest.mark.parametrize(
    ("wrong", "step"),
    [
        pytest.param("W2", "between node 'y_hat' and parameter 'W2' (dy_hat/dW2)", id="W2-slips-after-y_hat-not-h"),
        pytest.param("W1", "between node 'h' and parameter 'W1' (dh/dW1)", id="W1-slips-after-h"),
    ],
)
def test_the_last_step_names_the_node_the_parameter_feeds(wrong: str, step: str) -> None:
    result = only(run(branch_case(wrong), **CPU64))
    assert result.first_bad_node is None
    assert step in result.message


def test_a_wrong_custom_backward_is_located_at_the_node_below_it() -> None:
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(z)
            return z**3

        @staticmethod
        def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
            (z,) = ctx.saved_tensors
            return grad_output * 2 * z**2  # planted: d(z³)/dz is 3z²

    @case(params={"w": [0.5, -1.0]}, data={"x": [1.0, 2.0]})
    def cube(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = node("z", w * x)
        q = node("q", Cube.apply(z))
        return (q**2).sum()

    result = only(run(cube, **CPU64))
    assert (result.culprit, result.first_bad_node) == ("autograd", "z")
    assert "the slip is in the step dq/dz" in result.message


def test_json_has_first_bad_node_on_every_result_and_text_says_it_in_words() -> None:
    report = run([chain_case("b"), chain_case(None)], **CPU64)
    document = json.loads(FORMATS["json"](report))
    assert [r["first_bad_node"] for r in document["results"]] == ["b", None]
    assert "the derivation first goes wrong at node 'b'" in " ".join(FORMATS["text"](report).split())


def test_a_parameter_that_also_reaches_the_loss_directly_names_both_paths() -> None:
    @case(params={"w": [0.5, -1.0]}, data={"x": [1.0, 2.0], "y": [1.0, 0.0]})
    def ridge(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_hat = node("y_hat", w * x)
        return ((y_hat - y) ** 2).sum() + 0.1 * (w**2).sum()

    @ridge.manual
    def ridge_manual(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        dloss_dyhat = 2 * (w * x - y)
        return {"w": dloss_dyhat * x + 0.1 * w, "y_hat": dloss_dyhat}  # planted: d(w²)/dw is 2w

    result = only(run(ridge, **CPU64))
    assert "between node 'y_hat' and parameter 'w' (dy_hat/dw)" in result.message
    assert "or on a path from 'w' to the loss that passes none of these nodes" in result.message


def test_a_node_that_takes_another_directly_and_through_a_third_names_both_steps() -> None:
    # c = exp(tanh(a))·a uses a directly as well as through b = tanh(a): forgetting the direct
    # term dc/da is a slip at a, in the step dc/da or db/da, not in db/da alone.
    @case(params={"w": [0.7, -0.4]}, data={"x": [1.2, -0.5]}, name="two_paths")
    def two_paths(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = node("a", w * x)
        b = node("b", torch.tanh(a))
        c = node("c", torch.exp(b) * a)
        return 0.5 * (c**2).sum()

    @two_paths.manual
    def two_paths_manual(w: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = w * x
        b = torch.tanh(a)
        c = torch.exp(b) * a
        db = c * torch.exp(b) * a
        da = db * (1 - b**2)  # the slip: + c·exp(b), the path from a to c directly, forgotten
        return {"w": da * x, "a": da, "b": db, "c": c}

    result = only(run(two_paths, **CPU64))
    assert (result.verdict, result.culprit, result.first_bad_node) == ("mismatch", "manual", "a")
    assert "dloss/dc and dloss/db agree, dloss/da does not, so the slip is in the step dc/da or db/da" in result.message
