"""The loss at many perturbed points: the rows of a batch, each a flat vector of the perturbed
tensors (`Flat`), evaluated by `Batched` with one call of the forward under `torch.func.vmap`,
by the replay of one recording of the forward (replay.py) where that pays, or one forward pass
at a time where neither can.

A batched call is checked against a plain forward pass (one row of it: a wrong vmap rule, a
custom Function's own, must not corrupt the referee); rows are evaluated in chunks that bound
memory (CHUNK_BYTES); `evaluate_steps` evaluates the six stencil points (stencil.OFFSETS) of
every element at its step, with extra rows (the noise probe's) and the first settling round's
points (`Known`) in the same call.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from backprop_check.errors import CaseTimeout
from backprop_check.sources.replay import Program, Unreplayable
from backprop_check.sources.inplace import InPlace
from backprop_check.sources.stencil import OFFSETS

# A batched call evaluates at most MAX_BATCH rows, and (directions) MAX_BATCH_ELEMENTS input or output elements.
MAX_BATCH = 512
MAX_BATCH_ELEMENTS = 1 << 23
# The rows of one batch of elementwise perturbations (float64): bounded, whatever the size.
CHUNK_BYTES = 1 << 26
# The replay of the recorded forward (replay.py) costs a recording and a few plain forward
# passes before it pays: fewer elements than this are left to vmap of the whole forward. So is a
# replay whose chunks would hold fewer perturbations than MIN_REPLAY_ROWS (its values are that
# large): two rows of every chunk are checked with a plain forward pass, which must stay cheap.
REPLAY_FROM = 64
UNBATCHED_REPLAY_FROM = 2  # ... and from this many where vmap cannot batch the forward,
# once a process has paid the replay's first recording: a tensor subclass's first dispatch
# imports torch.distributed.tensor, about FIRST_RECORDING seconds (or where the forward passes
# the replay spares take longer than that).
FIRST_RECORDING = 0.5
MIN_REPLAY_ROWS = 64
# A tiny check (fewer differentiated elements than this in all, and a plain forward pass faster
# than REPLAY_SLOW_FORWARD seconds: an op_db sample, a small loss) is left to vmap of the whole
# forward: there the recording, its checked rows and the first dispatch to its tensor subclass
# (which imports torch.distributed.tensor) cost more than the forward passes they save.
REPLAY_CASE_FROM = 2048
REPLAY_SLOW_FORWARD = 1e-3

Loss = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
# The loss at the base values with some tensors set to each of their rows: (values, {name: (rows, *shape)}) → (rows,)
Linear = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


class Flat:
    """Some named tensors seen as one flat vector, so that one batch perturbs any of them."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.shapes = {name: t.shape for name, t in tensors.items()}
        self.slices: dict[str, slice] = {}
        start = 0
        for name, t in tensors.items():
            self.slices[name] = slice(start, start + t.numel())
            start += t.numel()
        self.size = start

    def join(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self.shapes:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([tensors[name].reshape(-1).to(torch.float64) for name in self.shapes])

    def split(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor in its own storage, not a view into `vector`: an op that reads storage
        through explicit strides and offsets (`as_strided`) must see the tensor's values only,
        as it does in the user's call, not its neighbours' in the flat vector."""
        return {name: vector[part].reshape(self.shapes[name]).clone() for name, part in self.slices.items()}

    def columns(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """`split` of every row of `batch` at once, for vmap: each tensor's columns as (rows,
        *shape), in storage of its own from offset 0 (vmap reads a row's strides and offsets
        from the row's start, so each row sees its own values only, as `split` gives them).
        A contiguous batch of one tensor is that already, and is not copied; under vmap, a
        copy per row costs 3-4 times the forward of an MLP's samples."""
        rows = batch.shape[0]
        if len(self.slices) == 1 and batch.is_contiguous() and batch.storage_offset() == 0:
            (name,) = self.shapes
            return {name: batch.reshape(rows, *self.shapes[name])}
        return {
            name: batch[:, part].clone(memory_format=torch.contiguous_format).reshape(rows, *self.shapes[name])
            for name, part in self.slices.items()
        }


def evaluate(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    h: torch.Tensor,
    index: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """The loss at θ + t·h, t in OFFSETS, for each element in `index` of the flat vector, as a
    (6, size) matrix (NaN for elements not in `index`).

    From REPLAY_FROM elements on, the recorded forward is replayed (`_replayed`); otherwise, or
    where it cannot be, the forward runs under vmap: the perturbed rows live in one buffer of at
    most CHUNK_BYTES, filled with θ once: from one chunk to the next only the 4 entries a row
    perturbs are put back and set anew, so building rows costs O(1) per evaluation, not
    O(size), and memory stays bounded at any size."""
    index = torch.as_tensor(index, dtype=torch.int64)
    if isinstance(batched, InPlace):  # a numpy forward (inplace.py)
        return batched.elements(flat, h, index, OFFSETS)
    base = flat.join(targets)
    f = torch.full((len(OFFSETS), flat.size), torch.nan, dtype=torch.float64)
    program = _program(batched, targets, flat, base, len(index))
    if program is not None:
        try:
            f[:, index] = _replayed(batched, program, targets, flat, base, h, index)
            return f
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - Unreplayable, or an op the replay cannot batch: vmap of it all
            batched.programs[tuple(flat.shapes)] = None
    f[:, index] = _vmapped(batched, targets, flat, base, index, h[index])[0]
    return f


def evaluate_steps(
    batched: Batched | InPlace,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    hs: Sequence[torch.Tensor],
    index: Sequence[int] | torch.Tensor,
    extra: torch.Tensor | None = None,
    ahead: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None, Known | None]:
    """`evaluate` at each of the step vectors `hs`: under vmap, the rows of every step go into
    the same batches (one batched call where `evaluate` per step would make one each), and so
    do the flat vectors `extra` (the noise probe's), whose losses come second (None where they
    were not evaluated: the replay and a numpy forward evaluate step by step), and the elements
    and steps `ahead` that settling is known to ask for next (`Known`; None where not evaluated)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    base = flat.join(targets)
    if isinstance(batched, InPlace) or _program(batched, targets, flat, base, len(index)) is not None:
        return [evaluate(batched, targets, flat, h, index) for h in hs], None, None
    # (one step vector, the usual case: the index itself, read only, and its steps)
    elements, steps = (index, hs[0][index]) if len(hs) == 1 else (index.repeat(len(hs)), torch.cat([h[index] for h in hs]))
    if ahead is not None:
        elements, steps = torch.cat([elements, ahead[0]]), torch.cat([steps, ahead[1]])
    values, probed = _vmapped(batched, targets, flat, base, elements, steps, extra)
    found = []
    for k in range(len(hs)):
        f = torch.full((len(OFFSETS), flat.size), torch.nan, dtype=torch.float64)
        f[:, index] = values[:, k * len(index) : (k + 1) * len(index)]
        found.append(f)
    known = None if ahead is None else Known(ahead[0], ahead[1], values[:, len(hs) * len(index) :])
    return found, probed, known


@dataclass
class Known:
    """The loss at θ + t·h (t in OFFSETS) for some flat elements at their steps, evaluated ahead
    in a batch that ran anyway (`evaluate_steps`): a settling round that asks for them reads
    them here, one batched call fewer (`rows`)."""

    elements: torch.Tensor
    steps: torch.Tensor
    values: torch.Tensor  # (len(OFFSETS), len(elements))

    def rows(
        self, evaluate_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], elements: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        """The (6, len(elements)) values at `elements` and steps `h`: those known from here, the
        others by `evaluate_at(elements, h)` (one call, for them alone)."""
        where = {(e, s): k for k, (e, s) in enumerate(zip(self.elements.tolist(), self.steps.tolist()))}
        found = [where.get(pair, -1) for pair in zip(elements.tolist(), h.tolist())]
        if min(found, default=0) >= 0:  # all known (the usual case: `_ahead` foresaw the round)
            return self.values[:, torch.tensor(found, dtype=torch.int64)]
        hit = torch.tensor([k >= 0 for k in found], dtype=torch.bool)
        out = torch.empty((len(OFFSETS), len(elements)), dtype=torch.float64)
        if bool(hit.any()):
            out[:, hit] = self.values[:, torch.tensor([k for k in found if k >= 0], dtype=torch.int64)]
        if not bool(hit.all()):
            out[:, ~hit] = evaluate_at(elements[~hit], h[~hit])
        return out


def _program(batched: Batched, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor, count: int) -> Program | None:
    """The recorded forward to replay `count` elements of `flat` with, or None (vmap): a group
    already recorded is replayed for a few elements too (the steps chosen again); another from
    REPLAY_FROM elements on, unless the check is tiny."""
    if getattr(batched, "programs", {}).get(tuple(flat.shapes)) is not None:
        return batched.program(targets, flat, base)
    # vmap cannot batch the forward (a custom Function without a vmap rule): each perturbation
    # would cost a forward pass of its own, where the replay of its ops costs a fraction of one
    if not batched.vmap_works and count >= UNBATCHED_REPLAY_FROM and batched.recording_pays(targets, flat, base, count):
        return batched.program(targets, flat, base)
    if count >= REPLAY_FROM and not batched.tiny(targets, flat, base):
        return batched.program(targets, flat, base)
    return None


def _vmapped(
    batched: Batched,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    base: torch.Tensor,
    elements: torch.Tensor,
    h: torch.Tensor,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss at θ + t·h, t in OFFSETS, for each flat element `elements[i]` at its step `h[i]`
    (an element may come more than once, at other steps), as a (6, len(elements)) matrix, by
    the forward under vmap: the perturbed rows live in one buffer of at most CHUNK_BYTES, filled
    with θ once; from one chunk to the next only the entries the rows perturb are put back and
    set anew, so building rows costs O(1) per evaluation, not O(size). The flat vectors `extra`
    ride along in the first chunk; their losses come second (None without elements)."""
    out = torch.empty((len(OFFSETS), len(elements)), dtype=torch.float64)
    per_chunk = elements_per_chunk(flat.size)
    count = min(per_chunk, len(elements)) * len(OFFSETS)
    if count == 0:
        return out, None
    rows = base.expand(count, -1).clone(memory_format=torch.contiguous_format)  # base.repeat(count, 1), at a third of its cost
    line = torch.arange(count)
    offsets = _OFFSETS.repeat(count // len(OFFSETS))
    previous: torch.Tensor | None = None
    probed = None
    for start in range(0, len(elements), per_chunk):
        idx = elements[start : start + per_chunk]
        n = len(idx) * len(OFFSETS)
        which = idx.repeat_interleave(len(OFFSETS))
        if previous is not None:
            rows[line[: previous.numel()], previous] = base[previous]
        # θ + t·h, exact (h a power of two): the same value as adding the offset to a copy of θ
        rows[line[:n], which] = base[which] + offsets[:n] * h[start : start + per_chunk].repeat_interleave(len(OFFSETS))
        if extra is not None and probed is None:
            values = batched(targets, flat, torch.cat([rows[:n], extra]))
            values, probed = values[:n], values[n:]
        else:
            values = batched(targets, flat, rows[:n])
        out[:, start : start + len(idx)] = values.reshape(len(idx), len(OFFSETS)).T
        previous = which
    return out, probed


_OFFSETS = torch.tensor(OFFSETS, dtype=torch.float64)  # read, never written


def _replayed(
    batched: Batched,
    program: Program,
    targets: Mapping[str, torch.Tensor],
    flat: Flat,
    base: torch.Tensor,
    h: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """`evaluate` by replaying the recorded forward (replay.py): the loss at θ ± h and
    θ ± h/2, θ ± h/4 for each element in `index`, as a (6, len(index)) matrix. Each tensor's first
    element is replayed alone, to learn how wide its states are, and the rest in chunks that
    hold them within the replay's memory bound. Two rows of every chunk are checked against a
    plain forward pass. Unreplayable where one differs, or where the chunks would hold fewer
    than MIN_REPLAY_ROWS perturbations."""
    which = index.repeat_interleave(len(OFFSETS))
    new = base[which] + torch.tensor(OFFSETS, dtype=torch.float64).repeat(len(index)) * h[which]
    starts = torch.tensor([part.start for part in flat.slices.values()])
    leaf_of = torch.searchsorted(starts, which, right=True) - 1
    out = torch.empty(which.numel(), dtype=torch.float64)
    vector = base.clone()  # the checked rows: one element set, then put back
    for leaf in leaf_of.unique().tolist():
        chosen = (leaf_of == leaf).nonzero().reshape(-1)
        start = 0
        while start < chosen.numel():
            if start and program.rows() < MIN_REPLAY_ROWS:
                raise Unreplayable(f"its values are too large to replay {MIN_REPLAY_ROWS} perturbations at once")
            part = chosen[start : start + (program.rows() if start else len(OFFSETS))]
            values = program(leaf, which[part] - starts[leaf], new[part])
            for row in {0, part.numel() // 2}:
                element = which[part[row]]
                vector[element] = new[part[row]]
                plain = batched.one(targets, flat, vector)
                vector[element] = base[element]
                if not _same(values[row], plain):
                    raise Unreplayable(f"the replay gives {float(values[row])!r}, the forward {float(plain)!r}")
            out[part] = values
            start += part.numel()
    return out.reshape(len(index), len(OFFSETS)).T


def elements_per_chunk(size: int) -> int:
    """How many elements one batch perturbs (6 rows each): as many as fit in CHUNK_BYTES of
    rows, at least one, at most MAX_BATCH rows."""
    return max(1, min(MAX_BATCH, CHUNK_BYTES // (8 * max(1, size))) // len(OFFSETS))


class _Probes:
    """The loss at each row of a batch of rounding probes: under vmap where it gives what a plain
    forward pass gives at the first row, else by plain forward passes one at a time."""

    def __init__(self, loss: Loss, vmap: bool) -> None:
        self.loss = loss
        self.vmap = vmap
        self.at_point: torch.Tensor | None = None  # as `Batched.at_point`

    def __call__(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.vmap:
                try:
                    values = _checked_under_vmap(self.loss, targets, flat, batch, self.at_point)
                    if values is not None:
                        return values.reshape(-1)
                except CaseTimeout:
                    raise
                except Exception:  # noqa: BLE001 - an op vmap cannot batch: one at a time, from now on
                    self.vmap = False
            return _one_by_one(self.loss, targets, flat, batch).reshape(-1)


class Batched:
    """Evaluates the loss for a batch of values of some tensors, with `vmap` where it works."""

    def __init__(self, loss: Loss, vmap: bool = True, linear: tuple[frozenset[str], Linear] | None = None) -> None:
        self.loss = loss
        # The tensors the loss is linear in, and the loss at many of their values in one call
        # (orders.py: order 2 of a Function vmap cannot batch, linear in its cotangents)
        self.linear = linear
        self.vmap_works = vmap  # False: the case knows vmap cannot batch it (orders.py)
        self.recordable = vmap  # False: its loss runs autograd inside (orders.py): never recorded
        self.note: str | None = None
        # per group of tensors, its recorded forward for one-element perturbations (None: none)
        self.programs: dict[tuple[str, ...], Program | None] = {}
        self._tiny: bool | None = None
        self._forward_seconds: float | None = None
        # The loss at the point (every target as given) from a plain forward pass, where the
        # caller has it: vmap's row there is checked against it, not a plain pass of its own.
        self.at_point: torch.Tensor | None = None

    def tiny(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor) -> bool:
        """Whether the check is too small for the replay to pay: REPLAY_CASE_FROM elements in
        all, a forward pass faster than REPLAY_SLOW_FORWARD (the faster of two: the first may
        pay first-use costs), and vmap batches it (two rows, the values of a plain call). Where
        vmap cannot batch the forward (a Function without a vmap rule), the replay is what
        spares a forward pass per perturbation: never tiny. Decided once."""
        if self._tiny is None:
            self._tiny = self.vmap_works and sum(t.numel() for t in targets.values()) < REPLAY_CASE_FROM
            if self._tiny:
                took = []
                for _ in range(2):
                    started = time.perf_counter()
                    plain = self.one(targets, flat, base)
                    took.append(time.perf_counter() - started)
                self._tiny = min(took) < REPLAY_SLOW_FORWARD and self._batches(targets, flat, base, plain)
        return self._tiny

    def recording_pays(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor, count: int) -> bool:
        """Whether recording the forward to replay `count` elements pays where vmap cannot batch
        it: always once the process has made its first recording (`FIRST_RECORDING`), before
        that where the forward passes one at a time, spent (`Looped`) and spared (len(OFFSETS)
        per element), take longer than it."""
        if _first_recording_paid():
            return True
        if self._forward_seconds is None:
            started = time.perf_counter()
            self.one(targets, flat, base)
            self._forward_seconds = time.perf_counter() - started
        return Looped.seconds + count * len(OFFSETS) * self._forward_seconds > FIRST_RECORDING

    def _batches(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor, plain: torch.Tensor) -> bool:
        """Whether vmap batches the forward at `base` (two rows equal to `plain`); a failure here
        changes nothing else (the evaluation that follows finds it again and says so)."""
        try:
            with torch.no_grad():
                values = _under_vmap(self.loss, targets, flat, torch.stack([base, base]))
            return _same(values[1], plain)
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - an op vmap cannot batch
            return False

    def one(self, targets: Mapping[str, torch.Tensor], flat: Flat, vector: torch.Tensor) -> torch.Tensor:
        """The loss at one flat vector of the tensors in `flat`."""
        with torch.no_grad():
            return self.loss({**targets, **flat.split(vector)})

    def program(self, targets: Mapping[str, torch.Tensor], flat: Flat, base: torch.Tensor) -> Program | None:
        """The forward recorded at `base` for one-element perturbations of the tensors in `flat`
        (replay.py), or None where it cannot be replayed: vmap of the whole forward then. Where
        vmap cannot batch the forward (a tile kernel's Function), the other floating-point
        tensors are traced too, never perturbed: what the forward makes from them (`out =
        torch.empty_like(q)` while k is perturbed) is then a value it follows, and a write into
        it can be replayed."""
        if not self.recordable:
            return None
        key = tuple(flat.shapes)
        if key not in self.programs:
            self.programs[key] = None
            others = [] if self.vmap_works else [
                name for name, t in targets.items() if name not in flat.shapes and t.is_floating_point()
            ]
            names = [*flat.shapes, *others]

            def loss(traced: Sequence[torch.Tensor]) -> torch.Tensor:
                return self.loss({**targets, **dict(zip(names, traced))})

            try:
                with torch.no_grad():
                    plain = self.one(targets, flat, base)
                    leaves = [*flat.split(base.clone()).values(), *(targets[name].clone() for name in others)]
                    self.programs[key] = Program.record(loss, leaves, plain)
            except CaseTimeout:
                raise
            except Exception:  # noqa: BLE001 - Unreplayable, or an error the plain forward reports
                pass
        return self.programs[key]

    def __call__(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        """The loss for each row of `batch`, a flat vector of the tensors in `flat`."""

        with torch.no_grad():
            if self.vmap_works:
                try:
                    values = _checked_under_vmap(self.loss, targets, flat, batch, self.at_point)
                    if values is not None:
                        return values
                    raise RuntimeError("vmap gives other values than a plain call (a wrong vmap rule?)")
                except CaseTimeout:
                    raise
                except Exception as exc:  # noqa: BLE001 - an op vmap cannot batch; the loop shows real errors
                    self.vmap_works = False
                    cause = exc.__cause__ or exc
                    self.note = (
                        "the forward pass could not be batched with torch.func.vmap "
                        f"({type(cause).__name__}{': ' + str(cause) if 'vmap rule' in str(cause) else ''}); "
                        "finite differences ran one by one"
                    )
            if self.linear is not None:
                return self._split_linear(targets, flat, batch)
            return _one_by_one(self.loss, targets, flat, batch)

    def _split_linear(self, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
        """The rows of `batch` that move only tensors the loss is linear in, by the case's one
        batched call (its first and last rows checked against plain forward passes; not used
        again where one differs or it fails); the others one by one."""
        assert self.linear is not None
        names, rows_of = self.linear
        moving = [name for name in flat.shapes if name in names]
        fixed = [flat.slices[name] for name in flat.shapes if name not in names]
        base = flat.join(targets)
        still = torch.ones(len(batch), dtype=torch.bool)
        for part in fixed:
            still &= (batch[:, part] == base[part]).all(1)
        if not moving or int(still.sum()) < 2:
            return _one_by_one(self.loss, targets, flat, batch)
        values = torch.empty(len(batch), dtype=torch.float64)
        chosen = batch[still]
        columns = flat.columns(chosen)
        try:
            found = rows_of({**targets, **flat.split(base)}, {name: columns[name] for name in moving})
            for row in {0, len(chosen) - 1}:
                if not _same(found[row], self.one(targets, flat, chosen[row])):
                    raise RuntimeError("the batched rows differ from a plain forward")
        except CaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - what is not batched so is evaluated one by one, as before
            self.linear = None
            return _one_by_one(self.loss, targets, flat, batch)
        values[still] = found.to(torch.float64)
        if bool((~still).any()):
            values[~still] = _one_by_one(self.loss, targets, flat, batch[~still])
        return values


def _checked_under_vmap(
    loss: Loss, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor, at_point: torch.Tensor | None
) -> torch.Tensor | None:
    """`_under_vmap`, or None where vmap gives other values than a plain forward pass: a wrong
    vmap rule (a custom Function's own) must not corrupt the referee. One row is checked, the
    point itself where `at_point` (the loss there, from a plain pass) is known: a row more in
    the batch, a pass fewer, and a rule that computes the first row and repeats it is caught;
    else the first row, against a plain pass of its own."""
    if at_point is None:
        values = _under_vmap(loss, targets, flat, batch)
        row, plain = values[0], loss({**targets, **flat.split(batch[0])})
    else:
        values = _under_vmap(loss, targets, flat, torch.cat([batch, flat.join(targets)[None]]))
        values, row, plain = values[:-1], values[-1], at_point
    if not _same(row.reshape(-1), plain.reshape(-1)):
        return None
    if len(values) > 1 and bool((values == values[:1]).all()):
        # Every row alike: a loss standing still on a stair, a constant, or a vmap rule that
        # repeats its first row. A plain pass at the last row tells: the rule's rows differ from
        # it, a stair's or a constant's do by rounding alone (then shifted onto it, as below).
        row, plain = values[-1], loss({**targets, **flat.split(batch[-1])})
        if not _same(row.reshape(-1), plain.reshape(-1)):
            return None
    # vmap's kernels may round the loss otherwise than the plain pass does (a cross-entropy of
    # confident logits: 3.5e-16 apart, terms of 20); its rows differ from each other by its own
    # rounding, and from the plain pass by that offset too. Shifted onto the plain pass at the
    # row checked, the rows and the loss at the point are one computation: the stencil's even
    # part and the noise lines see no step at the point that is none (a loss standing still on
    # its stairs read as a slope of 0 ± 1e-24).
    return values + (plain - row).to(values.dtype)


def _under_vmap(loss: Loss, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
    """The loss at every row of `batch` (flat vectors of the tensors in `flat`) in one call of
    the forward under vmap, each tensor in storage of its own (`Flat.columns`)."""
    return torch.func.vmap(lambda parts: loss({**targets, **parts}), randomness="error")(flat.columns(batch))


def _one_by_one(loss: Loss, targets: Mapping[str, torch.Tensor], flat: Flat, batch: torch.Tensor) -> torch.Tensor:
    """The loss at every row of `batch` by plain forward passes, one at a time, their time
    counted (`Looped`)."""
    started = time.perf_counter()
    values = torch.stack([loss({**targets, **flat.split(row)}) for row in batch])
    Looped.seconds += time.perf_counter() - started
    return values


class Looped:
    """The seconds this process has spent on forward passes one at a time where vmap could not
    batch them: once they pass FIRST_RECORDING, the first recording pays for itself (the loop
    already cost what it costs), as a ski rental does (`Batched.recording_pays`)."""

    seconds = 0.0


def _first_recording_paid() -> bool:
    """Whether this process has paid the replay's first recording: the import of
    torch.distributed.tensor that a tensor subclass's first dispatch makes (FIRST_RECORDING)."""
    return "torch.distributed.tensor" in sys.modules


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a differently ordered float64 sum."""
    if a.numel() == 1 and b.numel() == 1 and a.dtype == torch.float64 and b.dtype == torch.float64:
        # One loss each (the usual case): the same tests on Python floats (IEEE doubles, the
        # same arithmetic), where torch.isclose's composite of a dozen ops costs 15-40 µs.
        x, y = float(a), float(b)
        gap = abs(x - y)
        if x == y or (x != x and y != y) or (math.isfinite(gap) and gap <= abs(1e-12 * y)):
            return True
        size = abs(y)
        return gap <= 1e-12 * (size if size != size or size >= 1.0 else 1.0)  # clamp(min=1) keeps NaN
    return bool(torch.isclose(a, b, rtol=1e-12, atol=0.0, equal_nan=True).all()) or bool(
        ((a - b).abs() <= 1e-12 * b.abs().clamp(min=1.0)).all()
    )
