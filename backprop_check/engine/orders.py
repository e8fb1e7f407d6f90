"""Second and higher order: the derivative of the gradient, checked as a first-order check.

For a case whose loss is L(θ), the case of the next order has the loss

    L'(θ, v) = Σ_p ⟨u_p, ∂L/∂p⟩

for random cotangents u_p, one per parameter p of L (data, redrawn at every point). Its
gradient with respect to θ is the Hessian-vector product H·u. Autograd computes it by
differentiating its own backward (double backward: a custom Function's backward is itself
differentiated); the numerical referee by float64 finite differences of autograd's first-order
gradient, which order 1 has just checked. In a function check L = ⟨v, fn⟩ is linear in its
cotangents v, and v is differentiated too: ∂L'/∂v = J·u, the backward's derivative with respect
to its grad_output (what `gradgradcheck` also checks).

So every first-order tool applies unchanged to the next order: error bars, float32 judged by
its float64 twin, sampling and directions for large tensors, element localisation, hints,
every report format. `order=N` applies the construction N − 1 times. A hand-written
Hessian-vector product (`@case.hvp`) is the third source at order 2.

A backward that detaches a saved tensor (or runs under no_grad, or in numpy) is right to first
order and wrong to the second: its double backward is zero, or it misses a term, and the check of
order 2 says so with culprit autograd.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from backprop_check.diagnosis.hints import NOTHING_FLOWS, _function_name
from backprop_check.errors import CaseError, CaseTimeout, one_line, raised_at
from backprop_check.model.forward import call_forward, call_user
from backprop_check.model.points import Point, given_point
from backprop_check.model.case import Case
from backprop_check.records import CheckKind, Culprit, Verdict

def orders(case: Case, seed: int, full: bool = False) -> list[Case]:
    """The case and its derivatives up to `case.order`: [order 1, order 2, …]. A case that
    cannot be checked at order 1 gets no derivatives (its own result says why). `full`: the
    derivatives' finite differences are batched with vmap (torch.func.grad inside, whose first
    call costs seconds of imports: worth it for thousands of elements, not for the default
    mode's few hundred evaluations)."""
    case = case.prepared()
    cases = [case]
    if case.problem() is not None or case.order <= 1:
        return cases
    try:
        given = given_point(case, seed)
    except CaseError:
        return cases
    base = case
    for level in range(2, case.order + 1):
        base = Derivative(base, given, level, functional=full)
        given = given_point(base, seed)
        cases.append(base)
    return cases


class Derivative(Case):
    """The case of order `level` whose loss is ⟨u, ∇ loss of `base`⟩ (see the module docstring)."""

    def __init__(self, base: Case, given: Point, level: int, functional: bool = False) -> None:
        root = base.root if isinstance(base, Derivative) else base
        super().__init__(
            name=f"{root.name} (order {level})",
            forward=self._forward,
            sample=base.sample,
            rtol=base.rtol,
            atol=base.atol,
            file=base.file,
            line=base.line,
            modes=base.modes,
            order=level,
        )
        self.base, self.root, self._level = base, root, level
        self.template = given  # the base's given point: its module and complex names, for its forward
        self.what = f"(∇{base.what}·u)"
        self.functional = functional  # whether torch.func.grad takes the base's gradient
        self.batchable = functional  # without it autograd.grad runs inside: vmap cannot batch that
        self._functional_works = False  # torch.func.grad has taken the base's gradient once
        self.of = tuple(given.params)  # the base's parameters: ∂L/∂p for these
        linear = tuple(base.cotangent_names())  # the base's cotangents: L is linear in them
        values = {**given.params, **given.data}
        taken = set(values)
        self.directions: dict[str, str] = {}  # base parameter → the datum holding its u
        for p in self.of:
            label = f"u_{p}"
            while label in taken:
                label += "_"
            taken.add(label)
            self.directions[p] = label
        # A complex value stays complex (its real view becomes the complex tensor again), so that
        # this case's points name it complex too and show its elements as z[3].imag.
        values = {k: torch.view_as_complex(v) if k in given.complex else v for k, v in values.items()}
        for name in (*self.of, *linear):
            self.params[name] = values[name]
        for name, value in values.items():
            if name not in self.params:
                self.data[name] = value
        for p, label in self.directions.items():  # u in real terms: the real view's shape
            self.data[label] = _Direction(tuple(given.params[p].shape))
        if level == 2 and root.hvp_fn is not None:
            self.manual_fn = self._hvp

    @property
    def level(self) -> int:
        return self._level

    def cotangent_names(self) -> tuple[str, ...]:
        return tuple(self.directions.values())

    def problem(self) -> str | None:
        return self.base.problem() or super().problem()

    def describe_failure(self, exc: BaseException) -> str:
        """Autograd could not differentiate the base's gradient: say which order and why."""
        return f"autograd cannot differentiate the gradient of order {self.level - 1} ({self.base.name}): {one_line(exc)}"

    def _split(self, values: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        directions = set(self.directions.values())
        params = {p: values[p] for p in self.of}
        data = {k: v for k, v in values.items() if k not in params and k not in directions}
        return params, data

    def gradient(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The base's first-order gradient by autograd: kept differentiable (create_graph)
        where the caller differentiates it (autograd's double backward, forward over reverse),
        by `torch.func.grad` where finite differences only need its value, which vmap can batch.
        None where the gradient does not depend on the parameters at all."""
        params, data = self._split(values)
        # torch.func.grad under a transform (the referee's vmap), and once outside to learn that
        # it works; else plain autograd, faster where the referee evaluates one perturbation at a
        # time (a forward vmap cannot batch). Outside a transform the value is always plain
        # autograd's: the two round differently, and the loss at one point must not depend on
        # which call asks (the forward-is-pure guard compares three calls bit for bit).
        outside = not _under_transform()
        if self.functional and not (outside and self._functional_works) and not any(v.requires_grad for v in params.values()):
            try:
                with torch.enable_grad():
                    grads = dict(torch.func.grad(lambda p: call_forward(self.base, self._at(p, data))[0])(params))
                self._functional_works = True
                return self._graph(params, data) if outside else grads
            except CaseTimeout:
                raise
            except Exception:  # noqa: BLE001 - e.g. a Function without setup_context (a CaseError from the
                # user's call): plain autograd below, which raises again if the code is really broken
                grads = self._graph(params, data)  # raises inside vmap: the referee then loops
                self.functional = self.batchable = False
                return grads
        return self._graph(params, data)

    def _graph(self, params: dict[str, torch.Tensor], data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        # Differentiable only where the caller differentiates it (its values require grad): finite
        # differences need its value alone, without the graph of a double backward.
        differentiated = any(v.requires_grad for v in (*params.values(), *data.values()))
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss, _ = call_forward(self.base, self._at(leaves, data))
            if not loss.requires_grad:
                return {k: None for k in leaves}
            try:
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=differentiated, allow_unused=True)
            except CaseError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch's RuntimeError, or anything a custom Function's backward raises
                raise CaseError(f"autograd failed on the gradient of order {self.level - 1}: {one_line(exc)}{raised_at(exc)}") from exc
        return dict(zip(leaves, grads))

    def linear_names(self) -> tuple[str, ...]:
        """At order 2 of a function check, L = ⟨u, Jᵀv⟩ is linear in the cotangents v: the
        loss at many values of v is one forward pass and one batched backward (`linear_rows`)."""
        if self.level != 2 or not hasattr(self.base, "paired_outputs"):
            return ()
        return tuple(name for name in self.base.cotangent_names() if name in self.params)

    def linear_rows(self, at: Point, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L at `at` with each cotangent in `rows` set to each of its rows (rows, *shape): fn's
        outputs once, and the first-order gradient Jᵀv of every row by one backward with
        `is_grads_batched` (through a Function's backward too), each then dotted with u as
        `_forward` does."""
        values = {**at.params, **at.data}
        params, data = self._split(values)
        count = len(next(iter(rows.values())))
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            paired = self.base.paired_outputs(self._at(leaves, data))  # type: ignore[attr-defined]
        outputs, cotangents = [], []
        for label, output in paired.items():
            if not output.requires_grad:
                continue
            v = rows[label] if label in rows else values[label].expand(count, *values[label].shape)
            if label in at.complex:  # its real view, as the point holds it
                v = torch.view_as_complex(v.contiguous())
            outputs.append(output)
            cotangents.append(v.to(output.dtype))
        total = torch.zeros(count, dtype=torch.float64)
        if not outputs:
            return total
        grads = torch.autograd.grad(outputs, list(leaves.values()), cotangents, is_grads_batched=True, allow_unused=True)
        for p, g in zip(leaves, grads):
            if g is not None:
                real = torch.view_as_real(g.resolve_conj()) if g.is_complex() else g
                total = total + (values[self.directions[p]] * real).flatten(1).sum(1).to(torch.float64)
        return total

    def _forward(self, **values: torch.Tensor) -> torch.Tensor:
        first = values[self.of[0]]
        total = torch.zeros((), dtype=first.real.dtype, device=first.device)
        for p, g in self.gradient(values).items():
            if g is not None:  # a gradient that no longer depends on θ contributes a constant
                # ⟨u, g⟩ of the real views: Re Σ conj(u)·g for a complex parameter
                real = torch.view_as_real(g.resolve_conj()) if g.is_complex() else g
                total = total + (values[self.directions[p]] * real).sum()
        return total

    def _at(self, params: Mapping[str, torch.Tensor], data: Mapping[str, torch.Tensor]) -> Point:
        """The base's point with these values (its module, its complex names)."""
        return replace(self.template, params=dict(params), data=dict(data))

    def outputs(self, at: Point) -> tuple[torch.Tensor, ...]:
        """For forward mode (forward over reverse): the base's gradient itself, one output per
        parameter of the base."""
        values = {**at.params, **at.data}
        grads = self.gradient(values)
        return tuple(g if g is not None else torch.zeros_like(values[p]) for p, g in grads.items())

    def output_names(self) -> tuple[str, ...]:
        return tuple(f"d{self.base.what}/d{p}" for p in self.of)

    def _hvp(self, **values: torch.Tensor) -> Mapping[str, Any]:
        params, data = self._split(values)
        u = {p: values[label] for p, label in self.directions.items()}
        returned = call_user(self.root, "the .hvp", self.root.hvp_fn, {"u": u, **params, **data})
        if not isinstance(returned, Mapping):
            raise CaseError(f"the .hvp must return a dict of parameter name → (H·u) for it, got {type(returned).__name__}")
        return returned


def _under_transform() -> bool:
    """Whether a torch.func transform (vmap, grad) is running this call; True where this torch
    cannot say."""
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return level is None or level() is not None


class _Direction:
    """A random direction u of a parameter's shape, drawn from the point's generator."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(self.shape, generator=gen, dtype=torch.float64)


# The code of every backward that @once_differentiable wraps (one wrapper, one code object).
_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def _once_differentiable(case: Derivative) -> list[type]:
    """The user's custom Functions in the root case's graph whose backward is decorated with
    @once_differentiable: each makes every derivative of order ≥ 2 through it zero."""
    from backprop_check.diagnosis.graph import graph_of

    first = case
    while isinstance(first.base, Derivative):
        first = first.base
    try:
        graph = graph_of(first.base, first.template)
    except Exception:  # noqa: BLE001 - only a hint: a forward that will not run again says nothing here
        return []
    found = dict.fromkeys(f for functions in graph.functions.values() for f in functions)
    return [f for f in found if getattr(getattr(f, "backward", None), "__code__", None) is _ONCE_DIFFERENTIABLE]


def hints_for(case: Case, outcome: Any, found: list[str]) -> list[str]:
    """The hints of a mismatch at `outcome` for `case`, given those the patterns `found`: a
    derivative (order ≥ 2) knows better. A double backward that is zero where finite differences
    are not is the classic detached backward, right to first order and wrong from the second:
    said instead of the general "nothing flows back"."""
    if not isinstance(case, Derivative):
        return found
    wrong = [
        c for c in outcome.checks
        if c.verdict == Verdict.MISMATCH and c.culprit == Culprit.AUTOGRAD and c.kind == CheckKind.PARAM
    ]
    autograd = outcome.gradients.get("autograd")
    if not wrong or autograd is None:
        return found
    below = f"order {case.level - 1}"
    once = _once_differentiable(case)
    if once:
        named = " and ".join(_function_name(f) for f in once)
        return [
            f"{named}: its backward is decorated with @once_differentiable, which runs it under no_grad and "
            f"records no graph, so autograd's derivative of the {below} gradient through it is zero; to check "
            f"order {case.level}, write the backward in differentiable torch ops and drop the decorator (or check "
            f"order {case.level - 1} only)",
            *(hint for hint in found if NOTHING_FLOWS not in hint),
        ]
    if all(float(autograd.values[c.name].abs().max()) == 0.0 for c in wrong):
        return [
            f"autograd's derivative of the {below} gradient is exactly zero here, finite differences are not: the "
            "backward does not record a graph of its own (a saved tensor .detach()ed, torch.no_grad() or "
            "numpy inside backward, @once_differentiable, an inner Function whose backward returns None, or only "
            "intermediates of forward saved, which carry no graph), which is invisible to first order",
            *(hint for hint in found if NOTHING_FLOWS not in hint),
        ]
    return [
        f"where the check of {below} agrees, the backward is right but is differentiated wrongly: typically a "
        "saved tensor used .detach()ed, or a term computed outside autograd, inside backward, so double backward "
        "misses that term; or an intermediate computed in forward and saved (forward runs without a graph, so "
        "it is a constant to the double backward: save the inputs and recompute it in backward)",
        *found,
    ]
