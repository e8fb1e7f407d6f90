"""Elementwise finite differences without re-running the whole forward pass for every element.

Perturbing one element θ_i changes few values of a forward pass: X·W changes in one column when
W[i, j] does, tanh of that column in the same column, a softmax in the rows it touches. The
forward is recorded once at the point, as the aten operations it dispatches on the perturbed
tensors and on every value made from them (`Traced`, a tensor subclass), and replayed for a
batch of one-element perturbations. A value that differs
from the recorded one only at a few positions is carried as those positions and their new values
(`Sparse`); each operation that has a rule for that (pointwise, views, mm/addmm, sum/mean,
softmax) computes only the positions it changes; any other operation runs on the whole value,
batched over the perturbations with `torch.func.vmap` (a dense value, as vmap of the whole
forward would carry it).

What comes out is the loss of the forward pass itself at each perturbed point: the same
operations on the same numbers, up to the order of a sum (a product with a changed matrix is the
recorded product plus the change's own column, X[:, i]·ΔW[i, j]). No derivative rule of autograd
is used, so the referee stays independent of what it referees.

A tiled kernel's forward writes its tiles into a tensor it made itself (`out[..., i:i+T, :] =
acc / total`, `acc += p @ v`): such a `copy_` into a view, or an in-place operation (recorded as
its out-of-place twin, then written), becomes a new value of the whole tensor (the view's region
replaced, `_write_into`), and the tensor and every view of it still held are rebound to it, as
views see a write; the values they held before are kept for the operations that read them.

A forward that cannot be replayed this way says so while it is recorded: it changes an input in
place, or a tensor it read from outside (then or later), or writes through a view with no
scatter here (`diagonal`), reads a value that depends on the parameters back
into Python (`.item()`, `if x > 0`: the recorded path may not be the path at a perturbed point),
or reads memory behind torch's back (a traced value's own memory is NaN, so the recorded loss is
NaN, unlike the forward's). Then, and whenever a replayed value differs from a plain forward pass
at the rows checked in every chunk, the caller falls back to vmap of the whole forward.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from backprop_check.errors import CaseTimeout

aten = torch.ops.aten

STATE_BYTES = 1 << 26
MAX_ROWS = 1024
# A softmax along a dim this short runs in plain ops (`_softmax_along`).
SHORT_SOFTMAX = 32


class Unreplayable(Exception):
    """The recorded forward cannot be replayed for these perturbations (the message says why)."""


@dataclass(frozen=True)
class Ref:
    """A tensor of the recording, by its slot."""

    slot: int


@dataclass(frozen=True)
class Step:
    """One recorded operation: its arguments flattened (tensors as `Ref`s) and its output slots."""

    func: Any
    leaves: tuple[Any, ...]
    spec: Any
    outs: tuple[int, ...]

    def rebuild(self, values: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = pytree.tree_unflatten(list(values), self.spec)
        return args, kwargs


@dataclass(frozen=True)
class Sparse:
    """A batch of B values of a tensor that differ from its recorded value only at `pos`
    (B, k): flat row-major positions, distinct within a row, holding `new` (B, k)."""

    pos: torch.Tensor
    new: torch.Tensor


State = Sparse | torch.Tensor  # a torch.Tensor state is dense: (B, *shape)


class Traced(torch.Tensor):
    """A value that depends on the perturbed tensors, while the forward is recorded: every
    operation on it reaches `Recorder.dispatch`, which computes with its true value (`elem`).
    Its own memory holds NaN where the value is floating point, so code that reads it behind
    torch's back (a C++ loop over its data pointer) computes NaN, the recorded loss differs
    from the forward's, and the forward is not replayed; `.numpy()` and `.tolist()` fail."""

    elem: torch.Tensor
    recorder: Recorder
    slot: int

    @staticmethod
    def __new__(cls, elem: torch.Tensor, recorder: Recorder, slot: int) -> Traced:  # noqa: PYI034
        poison = torch.empty_strided(elem.size(), elem.stride(), dtype=elem.dtype, device=elem.device)
        if poison.is_floating_point() or poison.is_complex():
            poison.fill_(float("nan"))
        else:
            poison.copy_(elem)
        traced = torch.Tensor._make_subclass(cls, poison, elem.requires_grad)
        traced.elem, traced.recorder, traced.slot = elem, recorder, slot
        return traced

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        recorder = next(x.recorder for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, Traced))
        return recorder.dispatch(func, args, kwargs or {})

    def __repr__(self) -> str:  # a forward that prints a value
        return f"Traced({self.elem!r})"


# Operations that make a new tensor from another's shape alone (its values unread): their result
# is a value of its own, not a step (a tile kernel's `out = torch.empty_like(q)`).
CREATORS = {
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
}


# Views whose schema does not say so (matmul's result is one of its bmm's): written, they write
# into what they view, as any view.
UNSAFE_VIEWS = {aten._unsafe_view.default}


@dataclass(frozen=True)
class Views:
    """The view operations (func, its arguments after the tensor) from a tensor to a view of it,
    as a write into that view replays them (`_write_into`); one leaf of a Step."""

    chain: tuple[tuple[Any, tuple[Any, ...], tuple[tuple[str, Any], ...]], ...]


class Recorder:
    """Records the operations of one forward pass that depend on `leaves`."""

    def __init__(self, leaves: Sequence[torch.Tensor]) -> None:
        self.base: list[torch.Tensor] = []  # every tensor of the recording, kept alive (ids stay unique)
        self.constants: dict[int, int] = {}
        self.versions: list[tuple[torch.Tensor, int]] = []  # constants as they were when read
        self.steps: list[Step] = []
        self.broken: str | None = None
        self.leaves = [Traced(leaf, self, self._new(leaf)) for leaf in leaves]
        self.leaf_slots = [leaf.slot for leaf in self.leaves]
        # writes into views (`_write`): per view, the tensor it views and the view operations
        # from it; per tensor a write may rebind, its Traced; per such tensor, its views
        self.view_of: dict[int, tuple[int, Views]] = {}
        self.owners: dict[int, Traced] = {}
        self.views: dict[int, list[tuple[int, weakref.ref[Traced]]]] = {}
        self.created: set[int] = set()  # slots a CREATOR made: values that depend on no leaf

    def _new(self, tensor: torch.Tensor) -> int:
        self.base.append(tensor)
        return len(self.base) - 1

    def _constant(self, tensor: torch.Tensor) -> int:
        found = self.constants.get(id(tensor))
        if found is None:
            found = self.constants[id(tensor)] = self._new(tensor)
            self.versions.append((tensor, tensor._version))
        return found

    def changed_constants(self) -> bool:
        """Whether a constant the recording read has been changed in place since."""
        return any(tensor._version != version for tensor, version in self.versions)

    def dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        # the arguments with their true values, for the operations run here
        plain_args, plain_kwargs = pytree.tree_unflatten([x.elem if isinstance(x, Traced) else x for x in leaves], spec)
        if func is aten.copy_.default and isinstance(args[0], Traced):
            return self._write(args[0], args[1], kwargs)
        if func._schema.is_mutable:
            functional = _functional(func)
            if functional is not None and args and isinstance(args[0], Traced):
                # x.add_(y) is x written with x + y: the out-of-place op, then the write
                return self._write(args[0], self.dispatch(functional, args, kwargs), {})
            if self._fills(func, args, leaves):
                # A tensor the forward just made, filled in place from no traced value before
                # anything read it (a dropout's mask: `x.new_empty(shape).bernoulli_(p)`): a
                # value, as the tensor it fills is, not a step. A random fill stays the one
                # drawn here at every replay; where the forward draws another each time (no
                # seed set inside it), the recorded loss or the plain passes that check every
                # chunk differ from the replay's, and the forward is not replayed.
                func(*plain_args, **plain_kwargs)
                return args[0]
            self.broken = f"the forward changes a value in place ({func})"
            raise Unreplayable(self.broken)
        if func in CREATORS:
            out = func(*plain_args, **plain_kwargs)
            made = Traced(out, self, self._new(out))
            self.owners[made.slot] = made
            self.created.add(made.slot)
            return made
        refs = tuple(
            Ref(x.slot) if isinstance(x, Traced) else Ref(self._constant(x)) if isinstance(x, torch.Tensor) else x
            for x in leaves
        )
        out = func(*plain_args, **plain_kwargs)
        outs, out_spec = pytree.tree_flatten(out)
        if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
            self.broken = f"the forward reads a value that depends on the parameters into Python ({func})"
            raise Unreplayable(self.broken)
        slots = tuple(self._new(o) for o in outs)
        self.steps.append(Step(func, refs, spec, slots))
        made = [Traced(o, self, slot) for o, slot in zip(outs, slots)]
        viewed = args[0] if args and isinstance(args[0], Traced) else None
        if viewed is not None and len(made) == 1 and (func._schema.returns[0].alias_info is not None or func in UNSAFE_VIEWS):
            # a view of the first argument: a write into one writes into the other
            root, chain = self.view_of.get(viewed.slot, (viewed.slot, Views(())))
            self._view(made[0], root, Views((*chain.chain, (func, tuple(args[1:]), tuple(sorted(kwargs.items()))))))
        elif not any(r.alias_info is not None for r in func._schema.returns):
            for traced in made:  # a value of its own (views of several, split or unbind, are not written)
                self.owners[traced.slot] = traced
        return pytree.tree_unflatten(made, out_spec)

    def _fills(self, func: Any, args: tuple[Any, ...], leaves: list[Any]) -> bool:
        """Whether the in-place `func` changes only its first argument, a tensor a CREATOR made
        that no step has read yet, from no other traced value."""
        if not args or not isinstance(args[0], Traced) or args[0].slot not in self.created:
            return False
        if not _writes_first_alone(func) or sum(isinstance(x, Traced) for x in leaves) != 1:
            return False
        slot = args[0].slot
        return not any(isinstance(r, Ref) and r.slot == slot for step in self.steps for r in step.leaves)

    def _view(self, traced: Traced, root: int, chain: Views) -> None:
        self.view_of[traced.slot] = (root, chain)
        self.views.setdefault(root, []).append((traced.slot, weakref.ref(traced)))

    def _write(self, dst: Traced, src: Any, kwargs: dict[str, Any]) -> Traced:
        """dst.copy_(src), dst a view of a tensor the forward made (not an input): recorded as
        that tensor's new value (`_write_into`), the tensor rebound to it, and each view of it
        still held rebound to the same view of the new value (as views see a write). The values
        they held before are kept as they were (copied before the write) for what read them."""
        root, chain = self.view_of.get(dst.slot, (dst.slot, Views(())))
        owner = self.owners.get(root)
        unknown = [func for func, _, _ in chain.chain if func not in SCATTERS]
        if owner is None or owner.slot != root or root in self.leaf_slots or unknown or kwargs.get("non_blocking"):
            self.broken = (f"the forward writes into a view it cannot replay ({unknown[0]})" if unknown else
                           "the forward changes an input, or a tensor it did not make, in place (copy_)")
            raise Unreplayable(self.broken)
        views = self.views.pop(root, [])
        for aliased in (root, *(slot for slot, _ in views)):
            self.base[aliased] = self.base[aliased].clone()
        source = Ref(src.slot) if isinstance(src, Traced) else Ref(self._constant(src)) if isinstance(src, torch.Tensor) else src
        dst.elem.copy_(src.elem if isinstance(src, Traced) else src)
        written = self._new(owner.elem)  # the value after the write (copied at the next write)
        leaves, spec = pytree.tree_flatten(((Ref(root), source, chain), {}))
        self.steps.append(Step(_write_into, tuple(leaves), spec, (written,)))
        owner.slot = written
        self.owners[written] = owner
        for slot, alive in views:
            view = alive()
            if view is None or view.slot != slot:
                continue
            _, through = self.view_of[slot]
            view.slot = self._new(view.elem)
            leaves, spec = pytree.tree_flatten(((Ref(written), through), {}))
            self.steps.append(Step(_view_through, tuple(leaves), spec, (view.slot,)))
            self._view(view, written, through)
        return dst


class Program:
    """A recorded forward pass, replayed for one-element perturbations of its leaves."""

    def __init__(self, recorder: Recorder, result: torch.Tensor) -> None:
        self.recorder = recorder
        self.base = recorder.base
        self.steps = recorder.steps
        self.leaf_slots = recorder.leaf_slots
        self.result = result.slot if isinstance(result, Traced) else None
        self.loss = (result.elem if isinstance(result, Traced) else result).detach().reshape(())
        self._flat: dict[int, torch.Tensor] = {}
        # a state is dropped after the last step that reads it
        self.last_read: dict[int, int] = {}
        for number, step in enumerate(self.steps):
            for x in step.leaves:
                if isinstance(x, Ref):
                    self.last_read[x.slot] = number
        # values per perturbation a replay holds at once: the largest tensor it may make dense,
        # until a replay has shown how wide its states really are (`widest`)
        derived = {slot for step in self.steps for slot in step.outs}
        self.largest = max((self.base[slot].numel() for slot in derived), default=1)
        self.widest: int | None = None

    def rows(self) -> int:
        """How many perturbations one replay takes: their states within STATE_BYTES (counting
        four values alive at once, each as wide as the widest a replay has held, or before any
        replay the largest tensor it could make dense), at most MAX_ROWS."""
        width = self.widest if self.widest is not None else self.largest
        return max(1, min(MAX_ROWS, STATE_BYTES // (8 * 4 * max(1, width))))

    @staticmethod
    def record(
        loss: Callable[[Sequence[torch.Tensor]], torch.Tensor],
        leaves: Sequence[torch.Tensor],
        expected: torch.Tensor | None = None,
    ) -> Program:
        """Run `loss(traced)` once, `traced` standing for `leaves`, recording what depends on
        them; Unreplayable where it cannot be replayed, or where the recorded loss is not
        `expected` (the loss of a plain forward pass at the same point)."""
        recorder = Recorder(leaves)
        try:
            result = loss(recorder.leaves)
        except (Unreplayable, CaseTimeout):
            raise
        except Exception as exc:  # noqa: BLE001 - the forward failed on a traced value: not replayable
            raise Unreplayable(recorder.broken or f"{type(exc).__name__}: {exc}") from exc
        if recorder.broken is not None:  # the forward caught what the recorder raised
            raise Unreplayable(recorder.broken)
        if recorder.changed_constants():
            raise Unreplayable("the forward changes in place a tensor it has used")
        if not isinstance(result, torch.Tensor) or result.numel() != 1:
            raise Unreplayable("the loss is not a one-element tensor")
        program = Program(recorder, result)
        if expected is not None and not _close(program.loss, expected):
            raise Unreplayable(f"the recorded loss is {float(program.loss)!r}, the forward's {float(expected)!r}")
        return program

    def __call__(self, leaf: int, pos: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The loss for each perturbation b: leaf number `leaf` with its flat element pos[b] set to
        new[b] (float64 values, cast to the leaf's dtype as a plain forward would see them)."""
        if self.recorder.changed_constants():
            raise Unreplayable("a tensor the forward reads has been changed in place since it was recorded")
        slot = self.leaf_slots[leaf]
        count = pos.numel()
        states: dict[int, State] = {slot: Sparse(pos.reshape(-1, 1), new.reshape(-1, 1).to(self.base[slot].dtype))}
        widest = 1
        for number, step in enumerate(self.steps):
            if not any(isinstance(x, Ref) and x.slot in states for x in step.leaves):
                continue
            rule = RULES.get(step.func)
            if rule is None:
                rule = _pointwise if torch.Tag.pointwise in step.func.tags else _dense
            for out, state in zip(step.outs, rule(self, step, states, count)):
                state = states[out] = self._settled(out, state)
                widest = max(widest, 3 * state.pos.shape[1] if isinstance(state, Sparse) else state[0].numel())
                if out not in self.last_read and out != self.result:
                    del states[out]
            for x in step.leaves:
                if isinstance(x, Ref) and self.last_read.get(x.slot) == number and x.slot != self.result:
                    states.pop(x.slot, None)
        self.widest = max(self.widest or 1, widest)
        if self.result is None or self.result not in states:
            return self.loss.to(torch.float64).expand(count).clone()
        return self.dense(self.result, states[self.result], count).reshape(count).to(torch.float64)

    # values

    def flat(self, slot: int) -> torch.Tensor:
        found = self._flat.get(slot)
        if found is None:
            found = self._flat[slot] = self.base[slot].reshape(-1)
        return found

    def shape(self, slot: int) -> tuple[int, ...]:
        return tuple(self.base[slot].shape)

    def dense(self, slot: int, state: State, count: int) -> torch.Tensor:
        if not isinstance(state, Sparse):
            return state
        values = self.flat(slot).expand(count, -1).clone()
        values.scatter_(1, state.pos, state.new)
        return values.reshape(count, *self.shape(slot))

    def _settled(self, slot: int, state: State) -> State:
        """A sparse value that covers half its tensor or more is cheaper dense."""
        if isinstance(state, Sparse) and 2 * state.pos.shape[1] >= max(1, self.base[slot].numel()):
            return self.dense(slot, state, state.pos.shape[0])
        return state


Rule = Callable[[Program, Step, dict[int, State], int], list[State]]


def _changed(step: Step, states: Mapping[int, State]) -> list[int]:
    return [i for i, x in enumerate(step.leaves) if isinstance(x, Ref) and x.slot in states]


def _dense(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """The operation on whole values, batched over the perturbations by vmap."""
    changed = _changed(step, states)
    values = [program.base[x.slot] if isinstance(x, Ref) else x for x in step.leaves]
    batched = [program.dense(step.leaves[i].slot, states[step.leaves[i].slot], count) for i in changed]

    def one(*xs: torch.Tensor) -> Any:
        local = list(values)
        for i, x in zip(changed, xs):
            local[i] = x
        args, kwargs = step.rebuild(local)
        return step.func(*args, **kwargs)

    out = torch.func.vmap(one, randomness="error")(*batched)
    outs = pytree.tree_leaves(out)
    if len(outs) != len(step.outs):
        raise Unreplayable(f"{step.func} gave {len(outs)} outputs under vmap, {len(step.outs)} recorded")
    return outs


def _sparse_args(step: Step, states: Mapping[int, State]) -> list[int] | None:
    """The changed arguments, when all of them are sparse; None when one is dense."""
    changed = _changed(step, states)
    return None if any(not isinstance(states[step.leaves[i].slot], Sparse) for i in changed) else changed


def _pointwise(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """An elementwise operation at the positions its changed arguments reach (with broadcasting)."""
    changed = _sparse_args(step, states)
    if changed is None and len(step.outs) == 1:
        return _dense_pointwise(program, step, states, count)
    if changed is None or len(step.outs) != 1:
        return _dense(program, step, states, count)
    out_shape = program.shape(step.outs[0])
    reached = []
    for i in changed:
        slot = step.leaves[i].slot
        state = states[slot]
        assert isinstance(state, Sparse)
        reached.append(_broadcast(state.pos, state.new, program.shape(slot), out_shape))
    pos = reached[0][0]
    if any(not torch.equal(other, pos) for other, _ in reached[1:]):
        return _dense(program, step, states, count)
    local = list(step.leaves)
    for i, x in enumerate(step.leaves):
        if not isinstance(x, Ref):
            continue
        if i in changed:
            local[i] = reached[changed.index(i)][1]
        elif program.base[x.slot].dim() == 0:
            local[i] = program.base[x.slot]
        else:
            local[i] = program.flat(x.slot)[_project(pos, out_shape, program.shape(x.slot))]
    args, kwargs = step.rebuild(local)
    new = step.func(*args, **kwargs)
    expected = program.base[step.outs[0]]
    if not isinstance(new, torch.Tensor) or new.shape != pos.shape or new.dtype != expected.dtype:
        return _dense(program, step, states, count)  # type promotion of 0-d arguments, say
    return [Sparse(pos, new)]


def _dense_pointwise(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """An elementwise operation on dense values without vmap: each changed argument, (count,
    *shape), padded with size-1 dims to the output's rank, broadcasts as it did unbatched."""
    out = program.base[step.outs[0]]
    local: list[Any] = []
    for x in step.leaves:
        if isinstance(x, Ref) and x.slot in states:
            value = program.dense(x.slot, states[x.slot], count)
            local.append(value.reshape(count, *([1] * (out.dim() - value.dim() + 1)), *value.shape[1:]))
        else:
            local.append(program.base[x.slot] if isinstance(x, Ref) else x)
    args, kwargs = step.rebuild(local)
    new = step.func(*args, **kwargs)
    if not isinstance(new, torch.Tensor) or new.shape != (count, *out.shape) or new.dtype != out.dtype:
        return _dense(program, step, states, count)  # type promotion of a batched 0-d value, say
    return [new]


def _same_positions(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """A view that keeps row-major order (view, unsqueeze, squeeze, clone, detach, a dtype cast):
    the same flat positions, the values converted as the operation converts them."""
    changed = _sparse_args(step, states)
    if changed != [0] or len(step.outs) != 1:
        return _dense(program, step, states, count)
    state = states[step.leaves[0].slot]
    assert isinstance(state, Sparse)
    new = state.new
    if step.func is aten._to_copy.default:
        args, kwargs = step.rebuild([state.new, *step.leaves[1:]])
        new = step.func(*args, **kwargs)
    if new.dtype != program.base[step.outs[0]].dtype:
        return _dense(program, step, states, count)
    return [Sparse(state.pos, new)]


def _permuted(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """permute, t, transpose: positions moved with their coordinates."""
    changed = _sparse_args(step, states)
    if changed != [0]:
        return _dense(program, step, states, count)
    state = states[step.leaves[0].slot]
    assert isinstance(state, Sparse)
    shape = program.shape(step.leaves[0].slot)
    rank = len(shape)
    args, _ = step.rebuild(step.leaves)
    order = list(range(rank))
    if step.func is aten.permute.default:
        order = [d % rank for d in args[1]]
    elif rank >= 2:  # t, transpose
        first, second = (0, 1) if step.func is aten.t.default else (args[1] % rank, args[2] % rank)
        order[first], order[second] = order[second], order[first]
    coords = _unravel(state.pos, shape)
    out_shape = program.shape(step.outs[0])
    pos = _ravel([coords[d] for d in order], out_shape, state.pos)
    return [Sparse(pos, state.new)]


def _expanded(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """expand: every position the changed ones are broadcast to."""
    changed = _sparse_args(step, states)
    if changed != [0]:
        return _dense(program, step, states, count)
    slot = step.leaves[0].slot
    state = states[slot]
    assert isinstance(state, Sparse)
    pos, new = _broadcast(state.pos, state.new, program.shape(slot), program.shape(step.outs[0]))
    return [Sparse(pos, new)]


def _mm(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """mm(A, B) and addmm(C, A, B, beta, alpha) with one changed argument: the recorded product
    plus the change's own row (A changed at [n, i]: ΔA·B[i, :]) or column (B changed at [i, j]:
    A[:, i]·ΔB)."""
    changed = _sparse_args(step, states)
    if changed is None or len(changed) != 1:
        return _dense(program, step, states, count)
    args, kwargs = step.rebuild(step.leaves)
    addmm = step.func is aten.addmm.default
    beta, alpha = (kwargs.get("beta", 1), kwargs.get("alpha", 1)) if addmm else (0, 1)
    first = 1 if addmm else 0
    which = changed[0] - first  # -1: the added C, 0: A, 1: B
    slot = step.leaves[changed[0]].slot
    state = states[slot]
    assert isinstance(state, Sparse)
    out = step.outs[0]
    out_shape = program.shape(out)
    if which == -1:
        if beta == 0:
            return [program.base[out].expand(count, *out_shape)]
        pos, delta = _broadcast(state.pos, state.new - program.flat(slot)[state.pos], program.shape(slot), out_shape)
        return [Sparse(pos, program.flat(out)[pos] + beta * delta)]
    a, b = (program.base[x.slot] if isinstance(x, Ref) else x for x in step.leaves[first : first + 2])
    if a.dim() != 2 or b.dim() != 2:
        return _dense(program, step, states, count)
    rows, columns = out_shape
    delta = (state.new - program.flat(slot)[state.pos]) * alpha
    k = state.pos.shape[1]
    if which == 0 and 2 * k * columns >= rows * columns:  # rows of the product, most of them: dense
        n, i = state.pos // a.shape[1], state.pos % a.shape[1]
        if k == rows and bool((i == i[:, :1]).all()) and bool((n == torch.arange(rows)).all()):
            # one column of A changed (A = tanh(X·W) after W[:, j] did): an outer product
            return [program.base[out] + delta.unsqueeze(-1) * b[i[:, 0]].unsqueeze(1)]
        values = program.base[out].expand(count, rows, columns).clone()
        lines = (torch.arange(count).unsqueeze(-1) * rows + n).reshape(-1)
        values.view(count * rows, columns).index_add_(0, lines, (delta.reshape(-1, 1) * b.index_select(0, i.reshape(-1))))
        return [values]
    if which == 0:  # A[n, i] changed: row n of the product
        n, i = state.pos // a.shape[1], state.pos % a.shape[1]
        contribution = delta.unsqueeze(-1) * b[i]  # (count, k, columns)
        pos = n.unsqueeze(-1) * columns + torch.arange(columns)
        lines = n
    else:  # B[i, j] changed: column j of the product
        i, j = state.pos // b.shape[1], state.pos % b.shape[1]
        contribution = delta.unsqueeze(-1) * a.T[i]  # (count, k, rows)
        pos = torch.arange(rows) * columns + j.unsqueeze(-1)
        lines = j
    pos, contribution = pos.reshape(count, -1), contribution.reshape(count, -1)
    if _distinct(lines):
        return [Sparse(pos, program.flat(out)[pos] + contribution)]
    values = program.flat(out).expand(count, -1).clone()
    values.scatter_add_(1, pos, contribution)
    return [values.reshape(count, *out_shape)]


def _reduced(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """sum and mean, over everything or over dims: the recorded result plus the changes."""
    changed = _sparse_args(step, states)
    if changed != [0]:
        return _dense(program, step, states, count)
    args, kwargs = step.rebuild(step.leaves)
    slot = step.leaves[0].slot
    state = states[slot]
    assert isinstance(state, Sparse)
    out = step.outs[0]
    if program.base[out].dtype != program.base[slot].dtype:  # an integer sum, a dtype= cast
        return _dense(program, step, states, count)
    shape = program.shape(slot)
    rank = len(shape)
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    dims = list(range(rank)) if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0) else dims
    dims = {d % max(1, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
    delta = state.new - program.flat(slot)[state.pos]
    if step.func in (aten.mean.default, aten.mean.dim):
        size = 1
        for d in dims:
            size *= shape[d] if rank else 1
        delta = delta / size
    coords = _unravel(state.pos, shape)
    kept = [torch.zeros_like(c) if d in dims else c for d, c in enumerate(coords)] if keep else [
        c for d, c in enumerate(coords) if d not in dims
    ]
    pos = _ravel(kept, program.shape(out), state.pos)
    if _distinct(pos):
        return [Sparse(pos, program.flat(out)[pos] + delta)]
    values = program.flat(out).expand(count, -1).clone()
    values.scatter_add_(1, pos, delta)
    return [values.reshape(count, *program.shape(out))]


def _softmax(program: Program, step: Step, states: Mapping[int, State], count: int) -> list[State]:
    """_softmax and _log_softmax along a dim: the rows that hold a change, recomputed whole."""
    args, _ = step.rebuild(step.leaves)
    slot = step.leaves[0].slot
    state = states[slot]
    shape = program.shape(slot)
    if not shape:
        return _dense(program, step, states, count)
    dim = args[1] % len(shape)
    k = state.pos.shape[1] if isinstance(state, Sparse) else 0
    if not isinstance(state, Sparse) or 2 * k * shape[dim] >= program.base[slot].numel():
        # dense (or as good as: the changed rows are most of them): one dim further in
        return [_softmax_along(step.func, program.dense(slot, state, count), dim + 1, args[2])]
    coords = _unravel(state.pos, shape)
    rows = _ravel([c for d, c in enumerate(coords) if d != dim], [s for d, s in enumerate(shape) if d != dim], state.pos)
    if not _distinct(rows):
        return _dense(program, step, states, count)
    stride = _strides(shape)[dim]
    start = state.pos - coords[dim] * stride  # the row's first element
    pos = start.unsqueeze(-1) + torch.arange(shape[dim]) * stride  # (count, k, length)
    values = program.flat(slot)[pos]
    values.scatter_(2, coords[dim].unsqueeze(-1), state.new.unsqueeze(-1))
    new = _softmax_along(step.func, values, values.dim() - 1, args[2])
    if new.dtype != program.base[step.outs[0]].dtype:
        return _dense(program, step, states, count)
    return [Sparse(pos.reshape(count, -1), new.reshape(count, -1))]


def _functional(func: Any) -> Any:
    """The out-of-place twin of an in-place operation that changes its first argument alone
    (add_ → add, fill_ → fill, index_put_ → index_put), or None."""
    name = func.overloadpacket.__name__
    if not _writes_first_alone(func) or not name.endswith("_") or name.startswith("_"):
        return None
    twin = getattr(getattr(aten, name[:-1], None), func._overloadname, None)
    return None if twin is None or twin._schema.is_mutable else twin


def _writes_first_alone(func: Any) -> bool:
    """Whether the in-place `func` changes its first argument and nothing else."""
    writes = [a for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    return len(writes) == 1 and writes[0] is func._schema.arguments[0]


def _view_through(root: torch.Tensor, views: Views) -> torch.Tensor:
    """The view of `root` that the view operations `views` take."""
    for func, rest, named in views.chain:
        root = func(root, *rest, **dict(named))
    return root


def _write_into(root: torch.Tensor, src: torch.Tensor, views: Views) -> torch.Tensor:
    """`root` with the region `views` selects set to `src` (broadcast and cast as copy_ does),
    out of place: each view undone by its scatter, from the innermost out."""
    seen = [root]
    for func, rest, named in views.chain:
        seen.append(func(seen[-1], *rest, **dict(named)))
    value = src.to(seen[-1].dtype).expand_as(seen[-1])
    for (func, rest, named), below in zip(reversed(views.chain), reversed(seen[:-1])):
        value = SCATTERS[func](below, value, *rest, **dict(named))
    return value


def _bounds(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """A slice's start and end within `size`, as slice itself reads them (`x[1:]` records an
    end of 2⁶³ − 1, which slice_scatter refuses)."""
    start, end = 0 if start is None else start, size if end is None else end
    return tuple(min(max(x + size if x < 0 else x, 0), size) for x in (start, end))  # type: ignore[return-value]


def _inverse_permutation(dims: Sequence[int]) -> list[int]:
    order = [d % len(dims) for d in dims]
    return sorted(range(len(order)), key=order.__getitem__)


# Per view operation, how a value of the view goes back into the tensor it views.
SCATTERS: dict[Any, Callable[..., torch.Tensor]] = {
    aten.slice.Tensor: lambda below, value, dim=0, start=None, end=None, step=1: torch.slice_scatter(
        below, value, dim, *_bounds(below.shape[dim], start, end), step
    ),
    aten.select.int: lambda below, value, dim, index: torch.select_scatter(below, value, dim, index),
    aten.view.default: lambda below, value, size: value.reshape(below.shape),
    aten._unsafe_view.default: lambda below, value, size: value.reshape(below.shape),
    aten.alias.default: lambda below, value: value,
    aten.detach.default: lambda below, value: value,  # Tensor.__setitem__ writes through one
    aten.unsqueeze.default: lambda below, value, dim: value.reshape(below.shape),
    aten.squeeze.default: lambda below, value: value.reshape(below.shape),
    aten.squeeze.dim: lambda below, value, dim: value.reshape(below.shape),
    aten.squeeze.dims: lambda below, value, dims: value.reshape(below.shape),
    aten.transpose.int: lambda below, value, dim0, dim1: value.transpose(dim0, dim1),
    aten.t.default: lambda below, value: value.t(),
    aten.permute.default: lambda below, value, dims: value.permute(_inverse_permutation(dims)),
}


def _softmax_along(func: Any, values: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """aten's _softmax or _log_softmax of `values` along `dim`; along a float64 dim shorter than
    SHORT_SOFTMAX, the same in plain ops (shifted by the row's largest, as aten does), which
    are 1.5-3x faster there on the CPU: the logits of a 10-class cross-entropy, replayed for
    a thousand perturbations at once, spent half the full check in aten's kernel."""
    if half_to_float or values.dtype != torch.float64 or values.device.type != "cpu" or not 0 < values.shape[dim] < SHORT_SOFTMAX:
        return func(values, dim, half_to_float)
    shifted = values - values.amax(dim, keepdim=True)
    if func is aten._log_softmax.default:
        return shifted.sub_(shifted.exp().sum(dim, keepdim=True).log_())
    exp = shifted.exp_()
    return exp.div_(exp.sum(dim, keepdim=True))


RULES: dict[Any, Rule] = {
    **{
        op: _same_positions
        for op in (
            aten.view.default,
            aten._unsafe_view.default,
            aten.alias.default,
            aten.detach.default,
            aten.clone.default,
            aten.lift_fresh.default,
            aten.lift_fresh_copy.default,
            aten.unsqueeze.default,
            aten.squeeze.default,
            aten.squeeze.dim,
            aten.squeeze.dims,
            aten._to_copy.default,
        )
    },
    aten.permute.default: _permuted,
    aten.t.default: _permuted,
    aten.transpose.int: _permuted,
    aten.expand.default: _expanded,
    aten.mm.default: _mm,
    aten.addmm.default: _mm,
    aten.sum.default: _reduced,
    aten.sum.dim_IntList: _reduced,
    aten.mean.default: _reduced,
    aten.mean.dim: _reduced,
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _softmax,
    # a write into a view, a view taken again after one: on whole values, batched by vmap
    _write_into: _dense,
    _view_through: _dense,
}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a differently ordered float64 sum (NaN never is)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return bool(((a - b).abs() <= 1e-12 * b.abs().clamp(min=1.0)).all())


# positions


def _strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def _unravel(pos: torch.Tensor, shape: Sequence[int]) -> list[torch.Tensor]:
    return [(pos // stride) % size for stride, size in zip(_strides(shape), shape)]


def _ravel(coords: Sequence[torch.Tensor], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Flat row-major positions in `shape` of the coordinates (each shaped like `like`)."""
    return sum((c * stride for c, stride in zip(coords, _strides(shape))), torch.zeros_like(like))


def _distinct(lines: torch.Tensor) -> bool:
    """Whether the entries of each row of `lines` (count, k) are all different."""
    if lines.shape[-1] < 2:
        return True
    ordered = lines.sort(dim=-1).values
    return not bool((ordered[..., 1:] == ordered[..., :-1]).any())


def _broadcast(
    pos: torch.Tensor, new: torch.Tensor, shape: Sequence[int], out_shape: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of `out_shape` that positions `pos` of `shape` broadcast to, and their values."""
    shape, out_shape = tuple(shape), tuple(out_shape)
    if shape == out_shape:
        return pos, new
    rank = len(out_shape)
    aligned = (1,) * (rank - len(shape)) + shape
    coords = _unravel(pos, aligned)
    strides = _strides(out_shape)
    base = torch.zeros_like(pos)
    spread = torch.zeros(1, dtype=torch.int64)
    for d in range(rank):
        if aligned[d] == out_shape[d]:
            base = base + coords[d] * strides[d]
        else:
            spread = (spread.unsqueeze(-1) + torch.arange(out_shape[d]) * strides[d]).reshape(-1)
    count = pos.shape[0]
    out = (base.unsqueeze(-1) + spread).reshape(count, -1)
    return out, new.unsqueeze(-1).expand(*new.shape, spread.numel()).reshape(count, -1)


def _project(pos: torch.Tensor, out_shape: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The flat index in a tensor of `shape` that each position of the broadcast `out_shape` reads."""
    shape, out_shape = tuple(shape), tuple(out_shape)
    if shape == out_shape:
        return pos
    rank = len(out_shape)
    aligned = (1,) * (rank - len(shape)) + shape
    coords = _unravel(pos, out_shape)
    strides = _strides(aligned)
    index = torch.zeros_like(pos)
    for d in range(rank):
        if aligned[d] == out_shape[d]:
            index = index + coords[d] * strides[d]
    return index
