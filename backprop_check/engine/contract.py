"""The custom-Function contract: what a backward must do beyond giving the right values.

Checked at the given point of a function check, on every device and dtype, each as one `Check`
(kind "contract") whose mismatch blames autograd and names the user's Function class as
autograd's graph shows it (a `MyFnBackward` node is `MyFn`'s backward):

- grad_output:    the backward is linear in grad_output: zero cotangents give zero gradients,
                  a doubled cotangent a doubled gradient (one output at a time);
- undefined_grad: an output's gradient may be undefined (None under set_materialize_grads(False)):
                  one output at a time, then all of them;
- repeatable:     two backward passes on one graph agree within `nondet_tol`, the spread measured
                  (and where not, a fresh graph tells nondeterminism from a backward that edits
                  what it saved; every other item builds a fresh graph for each backward);
- grad_meta:      the gradients the Function's backward returns have its inputs' dtype, device
                  and shape (autograd casts a wrong dtype and sums a broadcast shape silently);
- layout:         the same values in another memory layout (non-contiguous, column-major, stride 0
                  where the slices are equal) give the same outputs and gradients, wherever fn's
                  forward accepts that layout and gives the same outputs for it;
- vmap:           a vmap-batched backward (is_grads_batched) equals the looped one, where the
                  backward can run under vmap;
- in_place:       the backward leaves grad_output as it found it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from backprop_check.diagnosis.hints import FORWARD_LAYOUT
from backprop_check.engine.guards import identical

from backprop_check.records import MISMATCH, OK, PARTS, Check, CheckKind, Culprit, unravel
from backprop_check.errors import CaseError, one_line
from backprop_check.model import complexes
from backprop_check.model.function import CONTRACT
from backprop_check.model.points import Point, derive_seed
from backprop_check.engine.tolerance import Tolerance

if TYPE_CHECKING:
    from backprop_check.model.function import FunctionCase

ITEMS = CONTRACT  # the items, in the order they are checked (model/function.py names them)
BATCH = 3  # cotangents in the vmap check: the probe's own, a random one, zeros
# float64's own allowance in the items: the gradient's response to inputs nudged by this many ulps
NUDGE_ULPS = 4
# A value (an output, a gradient) computed in another order may be this many times as far from
# float64 as the given computation is below float64 (`Probe._rounding`), and this many times as
# far as the nudges move it in float64 (`Probe._sensitivity`).
REORDERED = 4.0

Grads = dict[str, torch.Tensor]
_TINY = torch.finfo(torch.float64).tiny


def checks(
    case: FunctionCase, point: Point, device: str, dtype: torch.dtype, tol: Tolerance, only: Sequence[str] = ITEMS
) -> list[Check]:
    """One Check per contract item the case asks for (of those in `only`)."""
    probe = Probe(case, point, device, dtype, tol)
    found = []
    for item in ITEMS:
        if item in case.contract and item in only:
            try:
                found.append(ITEM_CHECKS[item](probe))
            except CaseError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's backward may raise anything
                raise CaseError(f"the contract check {item!r} could not run {probe.owner}: {one_line(exc)}") from exc
    return found


class Probe:
    """The function at one point in one dtype on one device: forward and backward passes."""

    def __init__(self, case: FunctionCase, point: Point, device: str, dtype: torch.dtype, tol: Tolerance) -> None:
        at = point.cast(dtype, device)
        self.case, self.tol, self.dtype, self.device = case, tol, dtype, device
        # complex inputs and cotangents as fn sees them (the point keeps real views)
        self.values = complexes.for_user({**at.params, **at.data}, point.complex)
        self.v = {k: self.values[label] for k, label in case.cotangents.items()}
        self.gen = torch.Generator().manual_seed(derive_seed("contract", case.name, point.label))
        # Passes more than one item needs, made once, each on a fresh graph: the gradient for zero
        # cotangents, the watched first backward (the gradient for the cotangents, on the graph
        # this first forward makes), and the rounding allowance.
        self._shared: dict[str, Any] = {}
        outputs, leaves = self.forward()
        self.outputs = tuple(o.detach().requires_grad_(o.requires_grad) for o in outputs)  # values and which need grad
        self._graph: tuple[tuple[torch.Tensor, ...], Grads] | None = (outputs, leaves)  # fresh: `watched` takes it
        self.classes = custom_functions(outputs)
        self._point = point
        self.owner = f"the backward of {' and '.join(self.classes)}" if self.classes else f"the backward of {case.label}"

    def forward(self, replace: Mapping[str, torch.Tensor] | None = None) -> tuple[tuple[torch.Tensor, ...], Grads]:
        """fn at the point (with some inputs replaced), the differentiated inputs as fresh leaves."""
        given = {**self.values, **(replace or {})}
        leaves = {n: given[n].detach().requires_grad_(True) for n in self.case.wrt}
        with torch.enable_grad():
            outputs = self.case._call({**given, **leaves})
        return outputs, leaves

    def grad(
        self,
        outputs: tuple[torch.Tensor, ...],
        leaves: Grads,
        cotangents: Mapping[int, torch.Tensor],
        *,
        retain: bool = True,
        batched: bool = False,
    ) -> Grads:
        """Σ_k ⟨cotangents[k], output k⟩ differentiated by autograd (zero where unused)."""
        # Copies: a backward that writes into its grad_output must not change the probe's.
        pairs = [(outputs[k], v.clone()) for k, v in cotangents.items() if outputs[k].requires_grad]
        return self._backward(pairs, leaves, retain=retain, batched=batched)

    def _backward(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], leaves: Grads, *, retain: bool, batched: bool = False
    ) -> Grads:
        """The gradient of every leaf for the (output, cotangent) `pairs`, zero where unused."""
        found: tuple[torch.Tensor | None, ...] = (None,) * len(leaves)
        if pairs:
            found = torch.autograd.grad(
                [o for o, _ in pairs], list(leaves.values()), [v for _, v in pairs],
                allow_unused=True, retain_graph=retain, is_grads_batched=batched,
            )
        out = {}
        for (name, leaf), g in zip(leaves.items(), found):
            if g is None or g._is_zerotensor():  # a ZeroTensor's storage cannot be read
                shape = tuple(g.shape) if g is not None else (BATCH, *leaf.shape) if batched else leaf.shape
                g = torch.zeros(shape, dtype=leaf.dtype if g is None else g.dtype, device=leaf.device)
            # a copy: a backward may return a tensor it saved, which a later backward edits
            out[name] = g.detach().clone()
        return out

    @property
    def rounding(self) -> dict[str, float]:
        """Per input, the allowance two computations of this gradient get (`_rounding`), measured
        at the first comparison that needs it: most compare bit-identical gradients (a zero
        cotangent, a doubled one, a second backward), which need none."""
        if "rounding" not in self._shared:
            self._shared["rounding"] = self._rounding(self._point, self.dtype, self.device)
        return self._shared["rounding"]

    def _rounding(self, point: Point, dtype: torch.dtype, device: str) -> dict[str, float]:
        """Below float64, per input, how far the dtype's rounding moves this very gradient: the
        largest |g_dtype − g_float64| at the same point, and the outputs' likewise. Two
        computations of one gradient in the dtype (another layout, a doubled grad_output) may
        differ by REORDERED times that each: the allowance the gradient itself gets (rounding.py).
        Empty where fn cannot run in float64."""
        if dtype == torch.float64:
            return self._sensitivity()
        if not dtype.is_floating_point:
            return {}
        try:
            exact = Probe.__new__(Probe)
            exact.case, exact.tol, exact.dtype, exact.device = self.case, self.tol, torch.float64, device
            exact.values = complexes.for_user({**point.rounded(dtype).cast(torch.float64, device).params,
                                               **point.rounded(dtype).cast(torch.float64, device).data}, point.complex)
            exact.v = {k: exact.values[label] for k, label in self.case.cotangents.items()}
            outputs, leaves = exact.forward()
            want = exact.grad(outputs, leaves, exact.v, retain=False)
            here = self.at_v()
            # The outputs too. Computed in another order (another layout, vmap's batch) a value may
            # round worse than here: torch sums a contiguous row pairwise, a strided one in
            # another order (a float32 layer norm at 1e4: the strided mean 2.5× as far from float64).
            found = {name: REORDERED * _largest_gap(here[name], want[name]) for name in want}
            return {**found, **{_output(k): REORDERED * _largest_gap(self.outputs[k], outputs[k]) for k in self.v}}
        except Exception:  # noqa: BLE001 - fn that holds tensors of the dtype: no float64 twin
            return {}

    def _sensitivity(self) -> dict[str, float]:
        """In float64, per input, REORDERED times how far this gradient moves when every input
        is nudged by NUDGE_ULPS ulps (relative), both ways. Where the function is ill-conditioned
        (x − mean at x ≈ 1e6 ± 1e-3: a layer norm of raw timestamps) two computations of one
        gradient in another order (vmap's batch, another layout) differ by about that much, and
        it is no finding; a well-conditioned gradient moves by a few ulps, far below the
        tolerance. Computed in another order a value may round worse, as below float64
        (`_rounding`): nn.MultiheadAttention at inputs of 1e2 gives gradients for column-major
        inputs 2.4 times as far from its own as the nudges move them."""
        try:
            here = self.at_v()
            cotangents = set(self.case.cotangents.values())
            moved: dict[str, float] = {}
            for sign in (1.0, -1.0):
                nudge = 1.0 + sign * NUDGE_ULPS * torch.finfo(torch.float64).eps
                replace = {
                    k: v * nudge for k, v in self.values.items()
                    if isinstance(v, torch.Tensor) and v.dtype in (torch.float64, torch.complex128) and k not in cotangents
                }
                outputs, leaves = self.forward(replace)
                there = self.grad(outputs, leaves, self.v, retain=False)
                for name in here:
                    if here[name].numel():
                        gap = (_real(there[name]) - _real(here[name])).abs().nan_to_num(0.0).max()
                        moved[name] = max(moved.get(name, 0.0), float(gap))
                for k in self.v:
                    moved[_output(k)] = max(moved.get(_output(k), 0.0), _largest_gap(self.outputs[k], outputs[k]))
            return {name: REORDERED * gap for name, gap in moved.items()}
        except Exception:  # noqa: BLE001 - fn that cannot run twice more: no allowance, the tolerance alone
            return {}

    def fresh(self, cotangents: Mapping[int, torch.Tensor], *, batched: bool = False) -> Grads:
        """The gradient for `cotangents` from a new forward pass: one backward per graph."""
        outputs, leaves = self.forward()
        return self.grad(outputs, leaves, cotangents, retain=False, batched=batched)

    def at_v(self) -> Grads:
        """The gradient for the cotangents on a fresh graph, computed once (by `watched`'s
        pass): the items that compare with it share it."""
        if "v" not in self._shared:
            self.watched()
        return self._shared["v"]

    def at_zero(self) -> Grads:
        """`fresh` of zero cotangents for every output, computed once."""
        if "zero" not in self._shared:
            self._shared["zero"] = self.fresh({k: torch.zeros_like(v) for k, v in self.v.items()})
        return self._shared["zero"]

    def watched(self) -> tuple[tuple[torch.Tensor, ...], Grads, dict[int, torch.Tensor], list[tuple[Any, list[torch.Tensor | None], list[int]]]]:
        """The first backward, for copies of the cotangents on a fresh graph, kept (repeatable
        runs a second backward on it, grad_meta calls the backward again), every custom
        Function's node watched (`_watched`): the outputs, leaves, the copies given, and the
        calls. Its gradient is `at_v`; grad_meta and in_place read the same pass."""
        if "watched" not in self._shared:
            outputs, leaves = self._graph or self.forward()
            self._graph = None
            given = {k: v.clone() for k, v in self.v.items()}
            pairs = [(outputs[k], v) for k, v in given.items() if outputs[k].requires_grad]
            with _watched(outputs) as calls:
                self._shared["v"] = self._backward(pairs, leaves, retain=True)
            self._shared["watched"] = (outputs, leaves, given, calls)
        return self._shared["watched"]

    def only(self, k: int, scale: float = 1.0) -> dict[int, torch.Tensor]:
        """Cotangents: `scale`·v_k for output k, zero for the others."""
        return {j: v * scale if j == k else torch.zeros_like(v) for j, v in self.v.items()}

    def differs(self, got: Grads, want: Grads, factor: float = 1.0) -> tuple[str, tuple[int | str, ...], float, float] | None:
        """The first input where `got` and `factor`·`want` disagree beyond the tolerance:
        (name, element, got, want), or None."""
        for name in want:
            b = factor * _real(want[name])
            a = _real(got[name]).reshape(b.shape)
            if torch.equal(a, b):  # the same bits (most comparisons here): nothing to weigh
                continue
            scale = float(b.abs().max()) if b.numel() else 0.0
            allowed = 2 * self.tol.allowed(torch.maximum(a.abs(), b.abs()), scale) + _TINY
            gap = (a - b).abs()
            same = (gap <= allowed) | (torch.isnan(a) & torch.isnan(b)) | (a == b)  # NaN where both are; equal infinities
            if not bool(same.all()) and scale > 0:
                # The rounding allowance only widens: measured (two more passes) where it is needed.
                # Not where 0 is wanted: a backward given zero grad_outputs multiplies them by
                # finite values, and gets 0 exactly (torch's "backward not multiplied by
                # grad_output"); a constant of 1e-10 added to a gradient that is the rounding of
                # cancelling terms (an attention's at 1e3) is no rounding.
                same |= gap <= allowed + 2 * max(1.0, abs(factor)) * self.rounding.get(name, 0.0)
            if not bool(same.all()):
                flat = int((~same).reshape(-1).nonzero()[0, 0])
                index: tuple[int | str, ...] = unravel(flat, tuple(b.shape))
                if want[name].is_complex():  # the real view's last index is the part: `[3].imag`
                    index = (*index[:-1], PARTS[int(index[-1])])
                return name, index, float(a.reshape(-1)[flat]), float(b.reshape(-1)[flat])
        return None


def _output(k: int) -> str:
    """The key output k's values go under in `differs` and `rounding` (no input name has a space)."""
    return f"output {k}"


def _largest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((_real(a).double() - _real(b).double()).abs().nan_to_num(0.0).max()) if a.numel() else 0.0


def _real(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64 on the CPU; a complex tensor as its real view (never its real part alone)."""
    t = t.detach()
    if t.dtype == torch.float64 and t.device.type == "cpu":  # most gradients here: nothing to convert
        return t
    t = t.to("cpu")
    return torch.view_as_real(t.resolve_conj()).to(torch.float64) if t.is_complex() else t.to(torch.float64)


def custom_functions(outputs: tuple[torch.Tensor, ...]) -> list[str]:
    """The custom Function classes in the graph of `outputs`, nearest the outputs first."""
    return list(dict.fromkeys(type_name(node) for node in _nodes(outputs) if _is_custom(node)))


def type_name(node: Any) -> str:
    cls = getattr(node, "_forward_cls", None)
    return cls.__name__ if cls is not None else type(node).__name__.removesuffix("Backward")


def _is_custom(node: Any) -> bool:
    return isinstance(node, torch.autograd.function.BackwardCFunction)


def _nodes(outputs: tuple[torch.Tensor, ...]) -> Iterator[Any]:
    seen: set[int] = set()
    queue = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while queue:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        queue.extend(n for n, _ in node.next_functions if n is not None)


def _result(item: str, failure: str | None, ok: str, spread: float = 0.0, allowed: float = 0.0) -> Check:
    bad = failure is not None
    return Check(
        name=item,
        kind=CheckKind.CONTRACT,
        shape=(),
        verdict=MISMATCH if bad else OK,
        culprit=Culprit.AUTOGRAD if bad else None,
        abs_err=spread,
        allowed=allowed,
        ratio=float("inf") if bad else 0.0,
        bad=int(bad),
        size=1,
        note=failure if bad else ok,
        culprits={Culprit.AUTOGRAD: 1} if bad else {},
    )


def _at(index: tuple[int | str, ...]) -> str:
    """`[2, 3]`, or `[3].imag` for an element of a complex tensor (its part last)."""
    part = index[-1] if index and isinstance(index[-1], str) else None
    numbers = index[:-1] if part else index
    return (f"[{', '.join(map(str, numbers))}]" if numbers else "") + (f".{part}" if part else "")


# --- the items ---------------------------------------------------------------------------------


def grad_output(p: Probe) -> Check:
    # A fresh graph for every backward: a backward that may run only once per graph (one that
    # edits what it saved, as Megatron's cross-entropy does) still gets a verdict here.
    zero = p.at_zero()
    # With one output, only(k) is the cotangents themselves (v·1.0): the shared pass.
    ones = {k: p.at_v() if len(p.v) == 1 else p.fresh(p.only(k)) for k in p.v}
    twos = {k: p.fresh(p.only(k, 2.0)) for k in p.v}
    nothing = {n: torch.zeros_like(g) for n, g in zero.items()}
    if p.differs(zero, nothing) is not None:
        name, index, got, _ = p.differs(zero, nothing)  # type: ignore[misc]
        ignored = [k for k in p.v if p.differs(ones[k], zero) is None]
        which = f"grad_output of output {', '.join(map(str, ignored))}" if ignored else "grad_output (a term does not depend on it)"
        return _result(
            "grad_output",
            f"{p.owner} ignores {which}: with every grad_output zero it still returns {got:.6g} for "
            f"input `{name}`{_at(index)} instead of 0 (a .sum() loss, grad_output = 1, hides this)",
            "",
        )
    for k in p.v:
        d1 = {n: ones[k][n] - zero[n] for n in zero}
        d2 = {n: twos[k][n] - zero[n] for n in zero}
        found = p.differs(d2, d1, 2.0)
        if found is not None:
            name, index, got, want = found
            return _result(
                "grad_output",
                f"{p.owner} does not scale with grad_output of output {k}: doubling it gives {got:.6g} for "
                f"input `{name}`{_at(index)}, not {want:.6g} (twice the gradient); a backward must multiply by grad_output",
                "",
            )
    return _result("grad_output", None, "zero grad_outputs give zero gradients, doubled ones double them")


def undefined_grad(p: Probe) -> Check:
    live = [k for k in p.v if p.outputs[k].requires_grad]
    if not live:
        return _result("undefined_grad", None, "no output requires grad")
    cases = [(None, "every output's gradient")] + ([(k, f"the gradient of output {k}") for k in live] if len(live) > 1 else [])
    for undefined, what in cases:
        outputs, leaves = p.forward()
        marked = [torch._C._functions.UndefinedGrad()(o) if undefined is None or k == undefined else o for k, o in enumerate(outputs)]
        try:
            got = p.grad(tuple(marked), leaves, p.v, retain=False)
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            return _result(
                "undefined_grad",
                f"{p.owner} fails when {what} is undefined (None, as under ctx.set_materialize_grads(False)): "
                f"{one_line(exc)}",
                "",
            )
        if undefined is None:
            want = p.at_zero()
        else:
            kept = {j: (torch.zeros_like(v) if j == undefined else v) for j, v in p.v.items()}
            want = p.fresh(kept)
        found = p.differs(got, want)
        if found is not None:
            name, index, a, b = found
            return _result(
                "undefined_grad",
                f"{p.owner} returns {a:.6g} for input `{name}`{_at(index)} when {what} is undefined (None), "
                f"but {b:.6g} when it is zero: an undefined gradient must count as zero",
                "",
            )
    return _result("undefined_grad", None, "undefined output gradients count as zero")


def repeatable(p: Probe) -> Check:
    """Two backward passes on one graph (retain_graph=True) agree within nondet_tol, as torch's
    reentrancy check asks. Where they do not, a fresh graph says what happened: the backward is
    nondeterministic (a fresh graph differs too), or it changes what it saved (a fresh graph
    gives the first values again: in place, or state kept on ctx), or it cannot run twice at
    all. Every other item builds a fresh graph for each backward, so such a kernel still gets
    their verdicts."""
    outputs, leaves, _, _ = p.watched()
    first = p.at_v()  # the first backward on that graph
    tol = p.case.nondet_tol
    try:
        second = p.grad(outputs, leaves, p.v, retain=True)  # kept: grad_meta calls the backward on it
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        return _result(
            "repeatable",
            f"{p.owner} can run only once per graph: a second backward on the same graph (retain_graph=True) "
            f"fails: {one_line(exc)[:240]} (it edits or frees a tensor it saved; the other contract items "
            "used a fresh graph for every backward; a backward meant to run once: leave `repeatable` out of contract=)",
            "",
        )
    spread, where = _spread(first, second)
    failure = None
    if not spread <= tol:
        fresh, _ = _spread(first, p.fresh(p.v))
        if fresh <= tol:
            failure = (
                f"{p.owner} is not repeatable on one graph: a second backward with the same grad_output differs by "
                f"up to {spread:.3g} for input `{where[0]}`{_at(where[1])}, while a fresh graph gives the first "
                f"values again (spread {fresh:.3g}; nondet_tol {tol:g}): the backward changes what it saved (in place, as "
                "probs.mul_(...), or state kept on ctx), so retain_graph=True gives wrong gradients (a backward "
                "meant to run once: leave `repeatable` out of contract=)"
            )
        else:
            failure = (
                f"{p.owner} is not repeatable: two backward passes with the same grad_output differ by up to "
                f"{spread:.3g} for input `{where[0]}`{_at(where[1])} (nondet_tol {tol:g}; raise nondet_tol if this "
                "nondeterminism is expected, e.g. atomic adds on a GPU)"
            )
    return _result("repeatable", failure, f"two backward passes agree: spread {spread:.3g} (nondet_tol {tol:g})", spread, tol)


def _spread(first: Grads, second: Grads) -> tuple[float, tuple[str, tuple[int | str, ...]]]:
    """The largest difference between two gradients, and where."""
    spread, where = 0.0, ("", ())
    for name in first:
        a, b = _real(first[name]), _real(second[name])
        if torch.equal(a, b):  # the same bits, no NaN (the usual case): a spread of 0 adds nothing
            continue
        diff = (a - b).abs()
        diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(diff), diff)
        diff = torch.nan_to_num(diff, nan=torch.inf)
        if diff.numel() and float(diff.max()) > spread:
            spread = float(diff.max())
            index: tuple[int | str, ...] = unravel(int(diff.reshape(-1).argmax()), tuple(diff.shape))
            if first[name].is_complex():
                index = (*index[:-1], PARTS[int(index[-1])])
            where = (name, index)
    return spread, where


@contextmanager
def _watched(outputs: tuple[torch.Tensor, ...]) -> Iterator[list[tuple[Any, list[torch.Tensor | None], list[int]]]]:
    """Hooks on every custom Function's backward node: per call, (node, a copy of the
    grad_outputs it received, the indices of those it changed in place)."""
    calls: list[tuple[Any, list[torch.Tensor | None], list[int]]] = []
    handles = []
    for node in (n for n in _nodes(outputs) if _is_custom(n)):

        def before(grad_outputs: tuple[torch.Tensor | None, ...], node: Any = node) -> None:
            calls.append((node, [g.detach().clone() if g is not None else None for g in grad_outputs], []))

        def after(grad_inputs: Any, grad_outputs: tuple[torch.Tensor | None, ...], node: Any = node) -> None:
            for seen, copies, changed in reversed(calls):
                if seen is node:
                    for i, (now, then) in enumerate(zip(grad_outputs, copies)):
                        if now is not None and then is not None and not identical(now, then):
                            changed.append(i)
                    break

        handles += [node.register_prehook(before), node.register_hook(after)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()



def grad_meta(p: Probe) -> Check:
    _, leaves, _, calls = p.watched()
    names = {id(leaf): name for name, leaf in leaves.items()}
    for node, grads, _ in calls:
        try:
            with torch.no_grad():
                raw = node._forward_cls.backward(node, *grads)
        except Exception:  # noqa: BLE001 - a second call is not guaranteed; repeatable covers it
            continue
        raw = raw if isinstance(raw, tuple) else (raw,)
        for i, (next_node, slot) in _edges(node):
            gradient = raw[i] if i < len(raw) else None
            if not isinstance(gradient, torch.Tensor):
                continue
            meta = next_node._input_metadata[slot]
            leaf = getattr(next_node, "variable", None)
            what = f"input `{names[id(leaf)]}`" if leaf is not None and id(leaf) in names else f"its input {i}"
            cls = type_name(node)
            if gradient.dtype != meta.dtype:
                return _result(
                    "grad_meta",
                    f"the backward of {cls} returns a {str(gradient.dtype).removeprefix('torch.')} gradient for {what}, "
                    f"which is {str(meta.dtype).removeprefix('torch.')}: autograd casts it silently {_cast_cost(gradient.dtype, meta.dtype)}",
                    "",
                )
            if tuple(gradient.shape) != tuple(meta.shape):
                return _result(
                    "grad_meta",
                    f"the backward of {cls} returns a gradient of shape {tuple(gradient.shape)} for {what}, of shape "
                    f"{tuple(meta.shape)}: autograd reshapes or sums it silently",
                    "",
                )
            if gradient.device != meta.device:
                return _result(
                    "grad_meta",
                    f"the backward of {cls} returns a gradient on {gradient.device} for {what}, on {meta.device}",
                    "",
                )
    return _result("grad_meta", None, "gradients have their inputs' dtype, device and shape")


def _cast_cost(given: torch.dtype, wanted: torch.dtype) -> str:
    """What casting a gradient of dtype `given` to its input's `wanted` costs, in words."""
    if given.is_floating_point and wanted.is_floating_point and torch.finfo(given).eps < torch.finfo(wanted).eps:
        return "(a wider dtype than its input's: nothing is lost, but the backward spends memory and time on it)"
    return "(precision is lost)"


def _edges(node: Any) -> list[tuple[int, tuple[Any, int]]]:
    """(the forward argument's position, its edge) for each input of a custom Function's node that
    requires grad. The backward returns one value per forward argument; the node has an edge per
    tensor argument only (fn(ctx, shapes, func, y0, …): torchdiffeq's adjoint), and those that
    require grad are the ones `needs_input_grad` marks, in order. [] where the two disagree."""
    wanted = [i for i, needed in enumerate(node.needs_input_grad) if needed]
    edges = [edge for edge in node.next_functions if edge[0] is not None]
    return list(zip(wanted, edges)) if len(wanted) == len(edges) else []


def in_place(p: Probe) -> Check:
    outputs, _, given, calls = p.watched()
    for k, v in p.v.items():
        if not identical(given[k], v):
            return _result("in_place", f"{p.owner} modifies grad_output of output {k} in place", "")
    for node, _, changed in calls:
        if changed:
            mine = [k for k, o in enumerate(outputs) if o.grad_fn is node and o.output_nr in changed]
            what = f"grad_output of output {mine[0]}" if mine else f"its grad_output {changed[0]}"
            return _result("in_place", f"the backward of {type_name(node)} modifies {what} in place", "")
    return _result("in_place", None, "grad_output is left unchanged")


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in memory with every other element skipped: non-contiguous."""
    return torch.stack([t, t], dim=-1).select(-1, 0)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions' strides swapped (column-major)."""
    return t.mT.contiguous().mT


def _expanded(t: torch.Tensor) -> torch.Tensor | None:
    """The same values as a stride-0 view of one slice, where every slice along the first
    dimension is equal (None elsewhere: another layout must not change the values)."""
    if t.dim() == 0 or t.shape[0] < 2 or not bool((t == t[:1]).all()):
        return None
    return t[:1].expand(t.shape)


LAYOUTS: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor | None]], ...] = (
    ("non-contiguous", lambda t: _strided(t) if t.dim() and t.numel() > 1 else None),
    ("column-major", lambda t: _column_major(t) if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1 else None),
    ("expanded (stride 0)", _expanded),
)


def layout(p: Probe) -> Check:
    """The same values in another memory layout give the same outputs and gradients. Where no
    custom Function is in the graph, only where the forward itself gives the same outputs for
    that layout: torch's ops that read strides (`as_strided`) or refuse a layout (`view`) are
    layout-dependent by definition. A custom Function's forward that gives other outputs is a
    finding (a kernel that reads storage as if it were contiguous); one that refuses the layout
    with an error (`assert x.is_contiguous()`) says so, and is not compared, as torch's own ops
    that refuse one; a backward that fails for a layout its forward accepted is a finding."""
    outputs, want = p.outputs, p.at_v()
    tensors = {n: t for n, t in p.values.items() if n not in p.case.cotangents.values()}
    ran, skipped = [], []
    for how, relaid in LAYOUTS:
        changed = {n: r for n, r in ((n, relaid(t)) for n, t in tensors.items()) if r is not None}
        if not changed:
            continue
        names = ", ".join(f"`{n}`" for n in changed)
        try:
            outputs2, leaves2 = p.forward(changed)
        except Exception:  # noqa: BLE001 - fn refuses the layout (a kernel that asserts contiguous input): nothing to compare
            skipped.append(f"{how}: fn refuses it")
            continue
        wrong = _first_difference(p, outputs2, outputs, {}, {})
        if wrong and p.classes:  # a custom kernel that reads storage as if it were contiguous
            forward = f"{FORWARD_LAYOUT}{' and '.join(p.classes)}"
            return _result("layout", f"{forward} gives {wrong} for {how} inputs ({names}) holding the same values", "")
        if wrong:  # torch's own ops that read strides (as_strided) are layout-dependent by definition
            skipped.append(f"{how}: fn's own outputs depend on the layout")
            continue
        try:
            got = p.grad(outputs2, leaves2, p.v, retain=False)
        except Exception as exc:  # noqa: BLE001 - the failure is the finding
            return _result("layout", f"{p.owner} fails for {how} inputs ({names}): {one_line(exc)}", "")
        wrong = _first_difference(p, outputs2, outputs, got, want, outputs_compared=True)
        if wrong:
            return _result("layout", f"{p.owner} gives {wrong} for {how} inputs ({names}) holding the same values", "")
        ran.append(how)
    note = f"{', '.join(ran)} inputs give the same outputs and gradients" if ran else "no other layout applies"
    if skipped:
        note += f" (not compared: {'; '.join(skipped)})"
    return _result("layout", None, note)


def _first_difference(
    p: Probe, got_out: tuple[torch.Tensor, ...], want_out: tuple[torch.Tensor, ...], got: Grads, want: Grads,
    outputs_compared: bool = False,
) -> str | None:
    """The first output, then gradient, that differs, in words; `outputs_compared`: the outputs
    were found the same already (by this very comparison), only the gradients are left."""
    for k in () if outputs_compared else p.v:
        found = p.differs({_output(k): got_out[k].detach()}, {_output(k): want_out[k].detach()})
        if found:
            return f"a different output {k} ({found[2]:.6g} instead of {found[3]:.6g} at {_at(found[1]) or 'its value'})"
    found = p.differs(got, want)
    if found:
        name, index, a, b = found
        return f"a different gradient for input `{name}` ({a:.6g} instead of {b:.6g} at {_at(index) or 'its value'})"
    return None


def vmap(p: Probe) -> Check:
    """Per-sample gradients under vmap against a loop: torch.func.vmap of the VJP (the
    Function's own vmap rule, where it has one), then autograd's is_grads_batched. Where no
    custom Function is in the graph, torch.func.vmap would only run torch's own batching rules
    (and import torch._dynamo, seconds, at its first use): is_grads_batched alone is checked
    there, as torch's check_batched_grad does."""
    outputs = p.outputs
    # The probe's own cotangents, random ones and zeros: the first and the last have their
    # looped gradients already (`at_v`, `at_zero`), the random ones a fresh pass each.
    batch = {
        k: torch.cat([v.unsqueeze(0), _random_like(v, p.gen, BATCH - 2), torch.zeros_like(v).unsqueeze(0)])
        for k, v in p.v.items()
    }
    looped = [p.at_v(), *(p.fresh({k: v[b] for k, v in batch.items()}) for b in range(1, BATCH - 1)), p.at_zero()]
    want = {n: torch.stack([g[n] for g in looped]) for n in p.case.wrt}
    # Under torch.func.vmap the forward runs batched too (through the Function's vmap rule).
    values = {_output(k): torch.stack([outputs[k].detach()] * BATCH) for k in batch}
    ran, skipped = [], []
    ways = (("torch.func.vmap", _func_vmap, {**values, **want}),) if p.classes else ()
    for how, batched, expected in (*ways, ("is_grads_batched", _grads_batched, want)):
        try:
            got = batched(p, batch)
        except Exception as exc:  # noqa: BLE001 - what vmap cannot batch has nothing to compare
            skipped.append(f"{how}: {one_line(exc)[:120]}")
            continue
        ran.append(how)
        found = p.differs(got, expected)
        if found:
            name, index, a, b = found
            what = name if name.startswith("output") else f"gradient of input `{name}`"
            who = " and ".join(p.classes) or p.case.label
            return _result(
                "vmap",
                f"{who} gives a different {what} under {how} (a wrong vmap rule?): batch element {index[0]}"
                f"{', element ' + _at(index[1:]) if index[1:] else ''}: {a:.6g} batched, {b:.6g} looped",
                "",
            )
    note = f"vmap-batched gradients ({' and '.join(ran)}, {BATCH} grad_outputs) equal the looped ones" if ran else "skipped"
    if skipped:
        note += f"; skipped {'; '.join(skipped)}"
    return _result("vmap", None, note)


def _random_like(v: torch.Tensor, gen: torch.Generator, count: int) -> torch.Tensor:
    """`count` random cotangents like `v` (complex in both parts for a complex `v`)."""
    if v.is_complex():
        return torch.view_as_complex(torch.randn((count, *v.shape, 2), generator=gen, dtype=torch.float64)).to(v)
    return torch.randn((count, *v.shape), generator=gen, dtype=torch.float64).to(v)


def _func_vmap(p: Probe, batch: Mapping[int, torch.Tensor]) -> Grads:
    names = p.case.wrt

    def single(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = p.case._call({**p.values, **dict(zip(names, xs))})
        return tuple(outputs[k] for k in batch)

    def pullback(vs: tuple[torch.Tensor, ...], *xs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        outputs, vjp = torch.func.vjp(single, *xs)
        return outputs, vjp(vs)

    xs = [p.values[n].detach().unsqueeze(0).expand(BATCH, *p.values[n].shape).clone() for n in names]
    outputs, grads = torch.func.vmap(pullback)(tuple(batch.values()), *xs)
    return {**{_output(k): o for k, o in zip(batch, outputs)}, **dict(zip(names, grads))}


def _grads_batched(p: Probe, batch: Mapping[int, torch.Tensor]) -> Grads:
    outputs, leaves = p.forward()
    return p.grad(outputs, leaves, batch, batched=True)


ITEM_CHECKS: dict[str, Callable[[Probe], Check]] = {
    "grad_output": grad_output,
    "undefined_grad": undefined_grad,
    "repeatable": repeatable,
    "grad_meta": grad_meta,
    "layout": layout,
    "vmap": vmap,
    "in_place": in_place,
}
