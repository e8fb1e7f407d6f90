"""The computational graph between a case's named nodes: which node feeds which.

The seeds draw the chain rule as a graph — w → ŷ → s → loss — and read one local gradient off
each edge. This module recovers that graph from a forward pass by walking autograd's record
of it (`grad_fn.next_functions`), keeping only the named things: parameters, `node()`s and the
loss. It says where a derivation can break (the step between the last node that agrees and
a parameter) and gives `explain` its local gradients.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from backprop_check.model.case import Case
from backprop_check.model.forward import call_forward
from backprop_check.model.points import Point

LOSS = "loss"


@dataclass
class Graph:
    """Named parameters, nodes and the loss, and the direct edges between them."""

    root: str  # the loss (a node's name when the loss itself is a named node)
    nodes: list[str]  # in the order the forward pass marked them
    params: list[str]
    inputs: dict[str, set[str]]  # name → the named things it is computed from directly
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # live tensors, if kept
    # name → the custom torch.autograd.Functions autograd runs between it and its direct inputs
    # (their backward is what autograd uses for that step; finite differences never run it).
    functions: dict[str, list[type]] = field(default_factory=dict)
    # parameter → the rows an embedding reads with padding_idx: torch leaves their gradient zero
    # by design, although the forward reads them (`padding_rows`)
    padding: dict[str, list[int]] = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        """The loss, the nodes from the loss back, then the parameters: the backward pass."""
        nodes = [name for name in reversed(self.nodes) if name != self.root]
        return [self.root, *nodes, *self.params]

    def consumers(self, name: str) -> list[str]:
        """The named things computed directly from `name`, nearest the loss first."""
        return [other for other in self.order if name in self.inputs.get(other, ())]

    def upstream(self, name: str) -> set[str]:
        """Every named thing `name` depends on, directly or through other nodes."""
        seen: set[str] = set()
        stack = list(self.inputs.get(name, ()))
        while stack:
            item = stack.pop()
            if item not in seen:
                seen.add(item)
                stack.extend(self.inputs.get(item, ()))
        return seen

    def nearest(self, param: str, among: Iterable[str]) -> list[str]:
        """Of the nodes `among`, those that depend on `param` along a path with none of the
        others on it: where the last step of the chain rule to `param` starts. A node that
        takes `param` directly and through another of them (c = exp(tanh(a))·a) is one."""
        fed = [name for name in among if param in self.upstream(name)]
        return [name for name in fed if self._reaches(name, param, set(fed) - {name})]

    def _reaches(self, name: str, param: str, blocked: set[str]) -> bool:
        """Whether `name` depends on `param` along a path that passes none of `blocked`."""
        seen: set[str] = set()
        stack = list(self.inputs.get(name, ()))
        while stack:
            item = stack.pop()
            if item == param:
                return True
            if item not in seen and item not in blocked:
                seen.add(item)
                stack.extend(self.inputs.get(item, ()))
        return False

    def bypasses(self, name: str, nodes: Iterable[str]) -> bool:
        """Whether `name` reaches the loss along a path that passes none of `nodes`."""
        blocked, seen, stack = set(nodes), set(), [name]
        while stack:
            item = stack.pop()
            if item == self.root:
                return True
            if item not in seen:
                seen.add(item)
                stack.extend(c for c in self.consumers(item) if c not in blocked)
        return False

    def local_gradient(self, consumer: str, name: str) -> float | None:
        """d`consumer`/d`name` when both are scalars and `name` reaches `consumer` only directly
        (a second path through another node would make autograd's total derivative differ
        from the local one); None otherwise or when the tensors were not kept."""
        out, into = self.values.get(consumer), self.values.get(name)
        if out is None or into is None or out.numel() != 1 or into.numel() != 1:
            return None
        others = self.inputs.get(consumer, set()) - {name}
        if name not in self.inputs.get(consumer, ()) or any(name in self.upstream(o) for o in others):
            return None
        (grad,) = torch.autograd.grad(out, into, retain_graph=True, allow_unused=True)
        return 0.0 if grad is None else float(grad)


def graph_of(case: Case, point: Point, *, keep_values: bool = False) -> Graph:
    """Run the forward pass at `point` (float64, CPU) with gradients on and read its graph."""
    params = {k: v.detach().to(torch.float64).clone().requires_grad_(True) for k, v in point.params.items()}
    with torch.enable_grad():
        loss, tape = call_forward(case, replace(point.cast(torch.float64), params=params))
    named_fns = {}
    for name, tensor in tape.values.items():
        if tensor.grad_fn is not None:
            named_fns.setdefault(tensor.grad_fn, name)
    param_ids = {id(tensor): name for name, tensor in params.items()}
    root = named_fns.get(loss.grad_fn, LOSS) if loss.grad_fn is not None else LOSS
    inputs = {name: _direct_inputs(tensor, named_fns, param_ids, params) for name, tensor in tape.values.items()}
    if root == LOSS:
        inputs[LOSS] = _direct_inputs(loss, named_fns, param_ids, params)
    values = {**params, **tape.values, LOSS: loss} if keep_values else {}
    if keep_values and root != LOSS:
        values.pop(LOSS)
    functions = {name: _custom_functions(t, named_fns) for name, t in {**tape.values, LOSS: loss}.items()}
    functions = {name: found for name, found in functions.items() if found}
    return Graph(root, list(tape.values), list(params), inputs, values, functions, padding_rows(loss, params))


def padding_rows(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per parameter, the padding rows of the embeddings (`embedding`, `embedding_bag` with
    padding_idx) that read it directly: their gradient is zero by torch's convention."""
    names = {id(tensor): name for name, tensor in params.items()}
    found: dict[str, list[int]] = {}
    for fn in _backward_nodes(loss, {}):
        row = getattr(fn, "_saved_padding_idx", None)
        if isinstance(row, int) and fn.next_functions:  # without one, torch saves -1 (as 2⁶⁴ − 1)
            weight = getattr(fn.next_functions[0][0], "variable", None)  # AccumulateGrad of a leaf
            name = names.get(id(weight))
            if name is not None and 0 <= row < weight.shape[0] and row not in found.setdefault(name, []):
                found[name].append(row)
    return found


def _backward_nodes(tensor: torch.Tensor, named_fns: dict[object, str]) -> Iterator[Any]:
    """Autograd's nodes on the way from `tensor` back, each once, not past the named ones."""
    stack, seen = [tensor.grad_fn] if tensor.grad_fn is not None else [], set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        yield fn
        stack.extend(f for f, _ in fn.next_functions if f is not None and f not in named_fns)


def _custom_functions(tensor: torch.Tensor, named_fns: dict[object, str]) -> list[type]:
    """The user's `torch.autograd.Function` classes on the way from `tensor` back to the named
    things it is computed from (autograd's node for one is `<Class>Backward`, with `_forward_cls`);
    the harness's own (a distributed check's `_OnRanks`) are not the user's to fix."""
    found: list[type] = []
    for fn in _backward_nodes(tensor, named_fns):
        cls = getattr(type(fn), "_forward_cls", None)
        if cls is not None and cls not in found and not cls.__module__.startswith("backprop_check."):
            found.append(cls)
    return found


def _direct_inputs(
    tensor: torch.Tensor,
    named_fns: dict[object, str],
    param_ids: dict[int, str],
    params: dict[str, torch.Tensor],
) -> set[str]:
    """The parameters and named nodes reachable from `tensor` without passing another node."""
    if tensor.grad_fn is None:  # a parameter marked as a node, or a constant
        return {param_ids[id(tensor)]} if id(tensor) in param_ids else set()
    found: set[str] = set()
    seen = set()
    stack = [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for following, _ in fn.next_functions:
            if following is None:
                continue
            if following in named_fns:
                found.add(named_fns[following])
                continue
            leaf = getattr(following, "variable", None)
            if leaf is not None:
                if id(leaf) in param_ids and leaf is params[param_ids[id(leaf)]]:
                    found.add(param_ids[id(leaf)])
                continue
            stack.append(following)
    return found
