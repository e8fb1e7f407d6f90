"""The graph between named nodes, read off autograd's record of a forward pass."""
from __future__ import annotations

import torch

from backprop_check import case, node
from backprop_check.diagnosis.graph import graph_of
from backprop_check.model.points import given_point


@case(params={"w": 1.0}, data={"x": 1.0, "y": 2.0})
def linear(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y_hat = node("y_hat", w * x)
    s = node("s", y_hat - y)
    return s**2


@case(params={"u": 0.5, "v": 2.0}, data={"x": 3.0})
def two_paths(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a feeds c twice: directly and through b."""
    a = node("a", u * x)
    b = node("b", a * v)
    c = node("c", a * b)
    return c + v


def test_the_linear_graph_is_the_seeds_chain() -> None:
    graph = graph_of(linear, given_point(linear, 0), keep_values=True)
    assert graph.order == ["loss", "s", "y_hat", "w"]
    assert graph.inputs == {"y_hat": {"w"}, "s": {"y_hat"}, "loss": {"s"}}
    assert graph.consumers("y_hat") == ["s"]


def test_local_gradients_are_the_seeds_numbers() -> None:
    graph = graph_of(linear, given_point(linear, 0), keep_values=True)
    assert graph.local_gradient("loss", "s") == -2.0  # d(s²)/ds = 2s
    assert graph.local_gradient("s", "y_hat") == 1.0
    assert graph.local_gradient("y_hat", "w") == 1.0  # = x


def test_a_local_gradient_with_a_second_path_is_not_given() -> None:
    graph = graph_of(two_paths, given_point(two_paths, 0), keep_values=True)
    assert graph.inputs["c"] == {"a", "b"}
    assert graph.local_gradient("c", "a") is None  # autograd would add the path through b
    assert graph.local_gradient("c", "b") == 1.5  # = a


def test_nearest_skips_nodes_that_lie_behind_others() -> None:
    graph = graph_of(two_paths, given_point(two_paths, 0))
    assert graph.nearest("u", ["a", "b", "c"]) == ["a"]
    assert graph.nearest("v", ["b", "c"]) == ["b"]
    assert graph.upstream("c") == {"a", "b", "u", "v"}


def test_without_kept_values_there_are_no_local_gradients() -> None:
    graph = graph_of(linear, given_point(linear, 0))
    assert graph.local_gradient("loss", "s") is None


def test_bypasses_finds_a_path_to_the_loss_around_the_given_nodes() -> None:
    graph = graph_of(two_paths, given_point(two_paths, 0))
    assert graph.bypasses("v", ["b", "c"])  # loss = c + v
    assert not graph.bypasses("u", ["a"])
