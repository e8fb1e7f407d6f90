"""Property-based tests: random small expression graphs, checked by the harness.

Each graph is written twice: once as a torch forward pass (what the harness differentiates
numerically and with autograd), and once through a reverse-mode pass written by hand in this
file (`backprop` below: every op's local derivative spelled out, never a call to autograd). The
hand-written gradient is the case's manual gradient, so a harness bug cannot hide behind a
shared code path.

- Correct graphs must be `ok` in float64 and float32: no false alarms.
- An error planted in the manual gradient (one element scaled by 1 + δ, its sign flipped, or a
  constant added, δ ≥ 1e-2) must be a mismatch blaming manual.
- The same error planted in a custom `torch.autograd.Function`'s backward, which the forward
  passes a parameter through, must be a mismatch blaming autograd.

Values stay where float32 is well conditioned: parameters and data in [-2, 2] (positive ones,
the only ones `log` sees directly, in [0.5, 3]), `exp` only of bounded values, every
intermediate bounded by `LIMIT` (a child that could exceed it is scaled down first), tanh and
sigmoid only of inputs where they do not saturate.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from backprop_check import case, run

LIMIT = 50.0  # largest magnitude any intermediate may reach
RANGE = (-2.0, 2.0)
POSITIVE = (0.5, 3.0)
# tanh' = 1 − tanh² and σ' = σ·(1 − σ) cancel where they saturate: at tanh(6.6) float32 keeps
# only two digits of 1 − tanh², and every float32 source (autograd and a hand-written manual
# gradient alike) is off by ~1% — a real loss of precision, not a bug. Inputs stay below these.
TANH_INPUT = 2.0
SIGMOID_INPUT = 4.0
MAX_PARAMS = 3
# CI runs a fixed, reproducible sample; BACKPROP_CHECK_EXAMPLES=2000 searches deeper.
PROPERTY = settings(
    max_examples=int(os.environ.get("BACKPROP_CHECK_EXAMPLES", "100")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
RUN = dict(devices=["cpu"], dtypes=["float64", "float32"], points=1)


@dataclass(eq=False)
class Node:
    """One operation of the expression tree; leaves name a parameter or a datum."""

    op: str
    args: tuple[Node, ...] = ()
    shape: tuple[int, ...] = ()
    name: str | None = None
    k: int = 0
    factor: float = 1.0

    def _repr_pretty_(self, printer, cycle) -> None:  # noqa: ANN001 - how hypothesis shows it
        printer.text(repr(self))

    def __repr__(self) -> str:
        if self.name is not None:
            return self.name
        if self.op == "pow":
            return f"({self.args[0]!r})**{self.k}"
        if self.op == "scale":
            return f"({self.factor:.3g}*{self.args[0]!r})"
        if self.op in ("add", "mul", "matmul"):
            symbol = {"add": "+", "mul": "*", "matmul": "@"}[self.op]
            return f"({self.args[0]!r} {symbol} {self.args[1]!r})"
        return f"{self.op}({self.args[0]!r})"


def evaluate(node: Node, env: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward pass with torch ops."""
    if node.name is not None:
        return env[node.name]
    a = [evaluate(child, env) for child in node.args]
    if node.op == "add":
        return a[0] + a[1]
    if node.op == "mul":
        return a[0] * a[1]
    if node.op == "matmul":
        return a[0] @ a[1]
    if node.op == "pow":
        return a[0] ** node.k
    if node.op == "scale":
        return a[0] * node.factor
    if node.op == "sum":
        return a[0].sum()
    if node.op == "mean":
        return a[0].mean()
    return {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "exp": torch.exp, "log": torch.log}[node.op](a[0])


def backprop(node: Node, g: torch.Tensor, env: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """Reverse mode by hand: push dloss/dnode = `g` to the children through each op's local
    derivative, and add it up at the parameters."""
    if node.op == "param":
        grads[node.name] = grads[node.name] + g
        return
    if node.op == "data":
        return
    a = [evaluate(child, env) for child in node.args]
    if node.op == "add":  # d(a + b) = da + db
        parts = [g, g]
    elif node.op == "mul":  # d(a·b) = b·da + a·db
        parts = [g * a[1], g * a[0]]
    elif node.op == "matmul":  # d(A@B) = dA@B + A@dB  →  gA = g@Bᵀ, gB = Aᵀ@g
        parts = [g @ a[1].T, a[0].T @ g]
    elif node.op == "scale":  # d(c·a) = c·da
        parts = [g * node.factor]
    elif node.op == "pow":  # d(aᵏ) = k·aᵏ⁻¹·da
        parts = [g * node.k * a[0] ** (node.k - 1)]
    elif node.op == "tanh":  # tanh' = 1 − tanh²
        t = torch.tanh(a[0])
        parts = [g * (1 - t * t)]
    elif node.op == "sigmoid":  # σ' = σ·(1 − σ)
        s = torch.sigmoid(a[0])
        parts = [g * s * (1 - s)]
    elif node.op == "exp":  # exp' = exp
        parts = [g * torch.exp(a[0])]
    elif node.op == "log":  # log' = 1/a
        parts = [g / a[0]]
    elif node.op == "sum":  # every element contributes with weight 1
        parts = [g * torch.ones_like(a[0])]
    elif node.op == "mean":  # … and with weight 1/N for the mean
        parts = [g * torch.ones_like(a[0]) / a[0].numel()]
    else:
        raise AssertionError(f"no derivative for {node.op}")
    for child, part in zip(node.args, parts):
        if child.shape == () and part.shape != ():  # a scalar broadcast over a tensor: sum back
            part = part.sum()
        backprop(child, part, env, grads)


@dataclass(frozen=True)
class Plant:
    """A planted error: element `index` scaled by 1 + δ, its sign flipped, or δ added to all
    elements (δ·max|g| when the gradient is large). The element is the largest in magnitude at
    the given point, so there the error is δ or more of the largest gradient: far above any
    tolerance. The element is fixed once chosen, as most slips are, or `moving`: picked anew on
    every call, like a bug in routing a gradient to the largest element, which jumps between
    tied elements as rounding breaks the tie (the rounding allowance must not absorb that)."""

    mode: str
    delta: float
    index: int | None = None  # None: the largest element of the gradient it is applied to
    moving: bool = False  # pick the largest element on every call, like a bug in max routing

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        flat = g.view(-1)
        worst = int(flat.abs().argmax()) if self.index is None or self.moving else self.index
        if self.mode == "scale":
            flat[worst] = flat[worst] * (1 + self.delta)
        elif self.mode == "flip":
            flat[worst] = -flat[worst]
        else:
            flat += self.delta * max(1.0, float(flat.abs().max()))
        return g


class PassThrough(torch.autograd.Function):
    """Identity forward with a hand-written backward, which may carry a planted error."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, plant: Plant | None) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        ctx.plant = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return (grad if ctx.plant is None else ctx.plant.apply(grad)), None


@dataclass
class Graph:
    """A random scalar expression over 1–3 parameters and some data, at a seeded point."""

    root: Node
    leaves: dict[str, tuple[str, tuple[int, ...], bool]]  # name → (param|data, shape, positive)
    seed: int

    @property
    def params(self) -> list[str]:
        return [name for name, (kind, _, _) in self.leaves.items() if kind == "param"]

    def draw(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        values = {}
        for name, (_, shape, positive) in self.leaves.items():
            lo, hi = POSITIVE if positive else RANGE
            values[name] = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
        return values

    def point(self) -> dict[str, torch.Tensor]:
        return self.draw(torch.Generator().manual_seed(self.seed))

    def gradient(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """dloss/dparam by the hand-written reverse mode."""
        grads = {name: torch.zeros_like(values[name]) for name in self.params}
        backprop(self.root, torch.ones((), dtype=values[self.params[0]].dtype), values, grads)
        return grads

    def target(self) -> tuple[str, int]:
        """The parameter with the largest gradient at the given point, and the flat index of its
        largest element: where errors are planted."""
        grads = self.gradient(self.point())
        name = max(grads, key=lambda name: float(grads[name].abs().max()))
        return name, int(grads[name].reshape(-1).abs().argmax())

    def detectable(self) -> bool:
        """Whether an error of 1e-2 of the largest gradient stands far clear of the numerical
        error bar (≈1e-9·|loss|) and the float32 rounding (≈1e-4 of the largest gradient)."""
        values = self.point()
        loss = float(evaluate(self.root, values))
        largest = max(float(g.abs().max()) for g in self.gradient(values).values())
        return largest > 1e-4 * max(1.0, abs(loss))

    def case(self, *, manual_plant: Plant | None = None, autograd_plant: Plant | None = None, through: bool = False):
        """The graph as a case; `through` routes the target parameter through `PassThrough`."""
        point = self.point()
        params = {name: point[name] for name in self.params}
        data = {name: value for name, value in point.items() if name not in params}
        target, index = self.target() if (manual_plant or autograd_plant or through) else (None, None)
        manual_plant = manual_plant and dataclasses.replace(manual_plant, index=index)
        autograd_plant = autograd_plant and dataclasses.replace(autograd_plant, index=index)

        def forward(**values):
            if target is not None:
                values[target] = PassThrough.apply(values[target], autograd_plant)
            return evaluate(self.root, values)

        def manual(**values):
            grads = self.gradient(values)
            if manual_plant is not None:
                grads[target] = manual_plant.apply(grads[target])
            return grads

        built = case(forward, params=params, data=data, sample=self.draw, name=f"graph_{self.seed}")
        built.manual(manual)
        return built

    def _repr_pretty_(self, printer, cycle) -> None:  # noqa: ANN001 - how hypothesis shows it
        printer.text(repr(self))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}{list(s)}{'+' if p else ''}" for n, (_, s, p) in self.leaves.items())
        return f"Graph(loss = {self.root!r}; {shapes}; seed {self.seed})"


@dataclass
class Builder:
    """Draws a random expression of a wanted shape, keeping every intermediate within LIMIT."""

    draw: st.DrawFn
    leaves: dict[str, tuple[str, tuple[int, ...], bool]] = field(default_factory=dict)

    def leaf(self, shape: tuple[int, ...], positive: bool = False) -> tuple[Node, float]:
        params = [n for n, (kind, s, p) in self.leaves.items() if kind == "param" and s == shape and p == positive]
        count = sum(kind == "param" for kind, _, _ in self.leaves.values())
        choices = ["data"] + (["reuse"] if params else []) + (["new"] if count < MAX_PARAMS else [])
        choice = "new" if count == 0 else self.draw(st.sampled_from(choices))
        if choice == "reuse":
            name = self.draw(st.sampled_from(params))
        else:
            kind = "param" if choice == "new" else "data"
            name = f"{'w' if kind == 'param' else 'x'}{sum(k == kind for k, _, _ in self.leaves.values())}"
            self.leaves[name] = (kind, shape, positive)
        return Node(self.leaves[name][0], shape=shape, name=name), (POSITIVE[1] if positive else 2.0)

    def bounded(self, shape: tuple[int, ...], depth: int, limit: float) -> tuple[Node, float]:
        """An expression whose magnitude is at most `limit` (scaled down if need be: squashing
        it through a saturated tanh would make float32 lose the gradient, see TANH_INPUT)."""
        node, bound = self.expr(shape, depth)
        return (node, bound) if bound <= limit else (Node("scale", (node,), shape, factor=limit / bound), limit)

    def positive(self, shape: tuple[int, ...], depth: int) -> tuple[Node, float]:
        """A strictly positive expression bounded away from 0, for log: log's output bound."""
        kind = "leaf" if depth <= 0 else self.draw(st.sampled_from(["leaf", "sigmoid", "exp"]))
        if kind == "leaf":
            node, _ = self.leaf(shape, positive=True)
            return node, max(abs(math.log(POSITIVE[0])), math.log(POSITIVE[1]))
        if kind == "sigmoid":  # σ(x) ≥ σ(−4) ≈ 0.018 for |x| ≤ 4
            child, _ = self.bounded(shape, depth - 1, SIGMOID_INPUT)
            return Node("sigmoid", (child,), shape), 4.1
        child, bound = self.bounded(shape, depth - 1, 2.0)  # log(exp(x)) = x
        return Node("exp", (child,), shape), bound

    def expr(self, shape: tuple[int, ...], depth: int) -> tuple[Node, float]:
        ops = ["leaf"] if depth <= 0 else ["leaf", "add", "mul", "pow", "tanh", "sigmoid", "exp", "log", "reduce"]
        if depth > 0 and len(shape) == 2:
            ops.append("matmul")
        if shape != ():
            ops.remove("reduce") if "reduce" in ops else None
        op = self.draw(st.sampled_from(ops))
        if op == "leaf":
            return self.leaf(shape)
        if op in ("add", "mul"):
            # Either operand may be a scalar broadcast over the other.
            shapes = [shape, shape]
            if shape != () and self.draw(st.booleans()):
                shapes[self.draw(st.integers(0, 1))] = ()
            (a, ba), (b, bb) = (self.bounded(s, depth - 1, LIMIT) for s in shapes)
            if op == "add":
                return Node("add", (a, b), shape), ba + bb
            if ba * bb > LIMIT:
                a, ba = Node("scale", (a,), a.shape, factor=LIMIT / (ba * bb)), LIMIT / bb
            return Node("mul", (a, b), shape), ba * bb
        if op == "pow":
            k = self.draw(st.integers(2, 3))
            child, bound = self.bounded(shape, depth - 1, LIMIT ** (1 / k))
            return Node("pow", (child,), shape, k=k), bound**k
        if op in ("tanh", "sigmoid"):
            child, _ = self.bounded(shape, depth - 1, TANH_INPUT if op == "tanh" else SIGMOID_INPUT)
            return Node(op, (child,), shape), 1.0
        if op == "exp":
            child, bound = self.bounded(shape, depth - 1, 2.0)
            return Node("exp", (child,), shape), math.exp(bound)
        if op == "log":
            child, bound = self.positive(shape, depth - 1)
            return Node("log", (child,), shape), bound
        if op == "matmul":
            inner = self.draw(st.integers(1, 3))
            a, ba = self.bounded((shape[0], inner), depth - 1, math.sqrt(LIMIT / inner))
            b, bb = self.bounded((inner, shape[1]), depth - 1, math.sqrt(LIMIT / inner))
            return Node("matmul", (a, b), shape), inner * ba * bb
        # reduce: the sum or mean of a small tensor
        inner_shape = self.draw(st.sampled_from([(2,), (3,), (2, 3), (3, 2), (1, 3)]))
        reduce = self.draw(st.sampled_from(["sum", "mean"]))
        child, bound = self.bounded(inner_shape, depth - 1, LIMIT / 6)
        return Node(reduce, (child,), ()), bound * (math.prod(inner_shape) if reduce == "sum" else 1)


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    builder = Builder(draw)
    shape = draw(st.sampled_from([(), (3,), (2, 3), (3, 2), (2, 2)]))
    root, _ = builder.expr(shape, draw(st.integers(1, 4)))
    if root.shape != ():
        root = Node(draw(st.sampled_from(["sum", "mean"])), (root,), ())
    return Graph(root, builder.leaves, draw(st.integers(0, 2**31 - 1)))


plants = st.builds(Plant, st.sampled_from(["scale", "flip", "add"]), st.floats(1e-2, 1.0), moving=st.booleans())


def verdicts(report) -> list[tuple[str, str, str | None]]:
    return [(r.dtype, r.verdict, r.culprit) for r in report.results]


def test_the_hand_written_reverse_mode_matches_a_known_gradient():
    # loss = sum(tanh(w) * x): dloss/dw = (1 − tanh²(w))·x, by hand.
    w, x = Node("param", shape=(2,), name="w"), Node("data", shape=(2,), name="x")
    graph = Graph(Node("sum", (Node("mul", (Node("tanh", (w,), (2,)), x), (2,)),), ()), {"w": ("param", (2,), False), "x": ("data", (2,), False)}, 0)
    values = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64), "x": torch.tensor([2.0, 3.0], dtype=torch.float64)}
    expected = (1 - torch.tanh(values["w"]) ** 2) * values["x"]
    assert torch.allclose(graph.gradient(values)["w"], expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "plant", [pytest.param(Plant("scale", 0.01), id="scale-by-1.01"), pytest.param(Plant("flip", 0), id="flip"), pytest.param(Plant("add", 0.01), id="add")]
)
def test_a_plant_changes_the_gradient_by_at_least_delta_of_its_largest_element(plant):
    g = torch.tensor([[0.5, -3.0], [1.0, 0.0]], dtype=torch.float64)
    planted = plant.apply(g)
    assert float((planted - g).abs().max()) >= 0.01 * 3.0
    assert torch.equal(g, torch.tensor([[0.5, -3.0], [1.0, 0.0]], dtype=torch.float64))  # untouched


def leaf(kind: str, name: str, shape: tuple[int, ...] = ()) -> Node:
    return Node(kind, shape=shape, name=name)


# Graphs a deeper search found, kept as explicit examples.
# Near its minimum the gradient is tiny (log(w0) ≈ 0) while the curvature is not: the numerical
# source's kink test took h³·f''''/16 for a jump and called a smooth loss nondifferentiable.
NEAR_MINIMUM = Graph(
    Node("sum", (Node("pow", (Node("mul", (Node("log", (leaf("param", "w0"),)), leaf("data", "x0", (3,))), (3,)),), (3,), k=3),)),
    {"w0": ("param", (), True), "x0": ("data", (3,), False)},
    1099,
)
# At the random point dloss/dw1 is ~1e-14, far inside the numerical error bar: manual (planted
# 2×) and autograd differ there and the referee cannot say which is off. That point must not
# veto the given point, where manual is plainly the odd one out.
UNDECIDED_AT_ONE_POINT = Graph(
    Node("sum", (Node("add", (
        Node("tanh", (Node("tanh", (Node("scale", (Node("add", (leaf("param", "w0", (3,)), leaf("data", "x0", (3,))), (3,)),), (3,), factor=0.5),), (3,)),), (3,)),
        Node("pow", (Node("scale", (Node("pow", (Node("add", (leaf("data", "x1"), leaf("param", "w1"))),), k=2),), factor=0.44),), k=2),
    ), (3,)),)),
    {"w0": ("param", (3,), False), "x0": ("data", (3,), False), "x1": ("data", (), False), "w1": ("param", (), False)},
    0,
)


@PROPERTY
@given(graph=graphs(), through=st.booleans())
@example(graph=NEAR_MINIMUM, through=False)
def test_correct_gradients_of_random_graphs_are_ok_in_float64_and_float32(graph, through):
    report = run([graph.case(through=through)], **RUN)
    assert verdicts(report) == [("float64", "ok", None), ("float32", "ok", None)], [r.message for r in report.results]


@PROPERTY
@given(graph=graphs(), plant=plants)
@example(graph=UNDECIDED_AT_ONE_POINT, plant=Plant("scale", 1.0))
def test_an_error_planted_in_the_manual_gradient_blames_manual(graph, plant):
    assume(graph.detectable())
    report = run([graph.case(manual_plant=plant)], **RUN)
    expected = [("float64", "mismatch", "manual"), ("float32", "mismatch", "manual")]
    assert verdicts(report) == expected, [r.message for r in report.results]


@PROPERTY
@given(graph=graphs(), plant=plants)
def test_an_error_planted_in_a_custom_backward_blames_autograd(graph, plant):
    assume(graph.detectable())
    report = run([graph.case(autograd_plant=plant)], **RUN)
    expected = [("float64", "mismatch", "autograd"), ("float32", "mismatch", "autograd")]
    assert verdicts(report) == expected, [r.message for r in report.results]
