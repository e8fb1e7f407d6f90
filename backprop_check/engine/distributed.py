"""Distributed checks: `fn` run on `world_size` ranks of `torch.distributed`, its backward
the ranks' own autograd through the user's collectives, checked against the global function.

A distributed check is a function check (function.py) whose `fn` is the *global* function:
the global inputs are sharded by `placements` (`Shard(d)`: the rank's chunk along d;
`Replicate()`: the whole tensor), every rank calls `fn` on its shards, and the outputs are
assembled by `out_placements` (`Shard(d)`: concatenated; `Replicate()`: every rank's must agree;
`Partial()`: summed). So the three sources are the engine's own:

- numerical: finite differences of ⟨v, global fn⟩, each perturbation of a global element reaching
  every rank that holds it. Batched: under `vmap` the ranks receive the whole batch of
  perturbed inputs in one request (`_OnRanks.vmap`), not one round trip per element;
- autograd: `_OnRanks.backward` sends the cotangent v, sharded like the outputs (a `Replicate()`
  or `Partial()` output's cotangent is the whole v on every rank), each rank runs
  `torch.autograd.grad` through its collectives, and each input's local gradients are assembled
  by `grad_placements` (`Shard(d)`: concatenated; `Replicate()`: rank 0's, every other rank's
  copy checked against it; `Partial()`: summed);
- manual (a hand-written VJP of the global function) as in any function check;
- with `reference=` (a single-process function of the global inputs), its float64 outputs and
  autograd gradient, checked against the ranks' and, where they differ, by the referee.

A mismatch is said in the user's terms (`rank_checks`): the rank, the input, the element of the
global tensor and of the rank's shard, and the likely slip (`_slip`).
"""
from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from backprop_check.diagnosis.hints import LIKELY_SLIP
from backprop_check.engine.tolerance import ERROR_BARS, Tolerance
from backprop_check.errors import CaseError, line_in, one_line, raised_at
from backprop_check.model.points import Point, generator
from backprop_check.model.function import FunctionCase
from backprop_check.options import TIMEOUT
from backprop_check.records import MISMATCH, Check, CheckKind, Culprit
from backprop_check.engine import outputs
from backprop_check.engine import ranks as processes

if TYPE_CHECKING:
    from backprop_check.sources import Gradients

# Every distributed check by key (file:line:name): under a launcher, the other ranks find the
# check rank 0 asks for here, having loaded the same case files.
REGISTRY: weakref.WeakValueDictionary[str, DistributedCase] = weakref.WeakValueDictionary()
# How many backward passes per check keep their ranks' local gradients for the diagnosis.
KEPT = 8
# How many elements of a wrong input the diagnosis estimates anew to tell the slip, unless the
# referee has estimated SLIP_KNOWN of them (of a small tensor, half) at the point already, each
# settled with its bar (its sample of a large tensor, the elements a verdict hangs on): those
# tell it, at no cost to the ranks.
SLIP_ELEMENTS = 64
SLIP_KNOWN = 16
# Along how many random directions each rank's part of a replicated input's gradient is
# estimated (`_parts_slip`): one to fit a rank's factor, two more to confirm it.
PART_DIRECTIONS = 3
# The ranks' parts are told apart for up to this many ranks (every subset of them is a hypothesis),
# where the rows that move one replica at a time hold at most PART_ELEMENTS values in all.
PART_RANKS = 8
PART_ELEMENTS = 2**22


@dataclass(frozen=True)
class PerRank:
    """An input whose value differs by rank (`values[r]` on rank r): one rank's replica of a
    `Replicate()` input moved while the others stay, to tell the ranks' parts of its gradient."""

    values: tuple[Any, ...]


def _placement_classes() -> tuple[type, type, type]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Shard, Replicate, Partial


def describe_placement(placement: Any) -> str:
    Shard, Replicate, Partial = _placement_classes()
    if isinstance(placement, Shard):
        return f"Shard({placement.dim})"
    if isinstance(placement, Replicate):
        return "Replicate()"
    if isinstance(placement, Partial):
        return "Partial()"
    return repr(placement)


class DistributedCase(FunctionCase):
    """`fn` checked on `world_size` ranks (see the module docstring)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: Any,
        *,
        world_size: int,
        placements: Sequence[Any],
        out_placements: Sequence[Any],
        grad_placements: Sequence[Any] | None = None,
        backend: str | None = None,
        reference: Callable[..., Any] | None = None,
        timeout: float | None = TIMEOUT,
        **options: Any,
    ) -> None:
        options["contract"] = ()  # the custom-Function contract runs in one process only
        super().__init__(fn, inputs, **options)
        self.world_size = world_size
        self.placements = tuple(placements) if isinstance(placements, (tuple, list)) else (placements,)
        self.out_placements = tuple(out_placements) if isinstance(out_placements, (tuple, list)) else (out_placements,)
        given = self.placements if grad_placements is None else grad_placements
        self.grad_placements = tuple(given) if isinstance(given, (tuple, list)) else (given,)
        self.backend = backend
        # not `reference`: that attribute makes a one-process kernel check (engine/reference.py)
        self.global_reference = reference
        self.timeout = float(timeout or TIMEOUT)
        self.batchable = True
        self.key = f"{self.file}:{self.line}:{self.name}"
        self.ranks: processes.Forked | processes.Launched | None = None
        self.single_output: bool | None = None
        # (inputs, per-rank local gradients) of the latest backward passes, for the diagnosis
        self.recent: list[tuple[list[Any], list[dict[str, torch.Tensor]]]] = []
        REGISTRY[self.key] = self
        if reference is not None and not callable(reference) and self.broken is None:
            self.broken = f"reference= must be a function with {self.label}'s signature, got {type(reference).__name__}"

    # --- what the user gave -----------------------------------------------------------------

    def prepared(self) -> DistributedCase:
        """A distributed check is the engine's own object (it holds its ranks, and they find it
        by its key): it learns its outputs in place, once."""
        if self.broken is None:
            self.broken = self._placement_problem()
        if self.output_shapes is None and self.broken is None:
            try:
                self._learn_outputs()
            except CaseError as exc:
                self.broken = str(exc)
        return self

    def problem(self) -> str | None:
        if self.broken is None:
            self.broken = self._placement_problem()
        found = super().problem()
        if found and self.output_shapes is None:
            self.broken = found  # the ranks failed at the given inputs: once is enough to say so
        return found

    def _placement_problem(self) -> str | None:
        Shard, Replicate, Partial = _placement_classes()
        w = self.world_size
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            return f"world_size must be a positive whole number of ranks, got {w!r}"
        if self.order != 1 or tuple(self.modes) != ("rev",):
            return "a distributed check checks the first-order backward (order=1, modes=('rev',)) only"
        backend = self.backend or "gloo"
        if backend not in ("gloo", "nccl"):
            return f"backend={backend!r}: choose 'gloo' (CPU) or 'nccl' (CUDA)"
        if not processes.launched() and (backend == "nccl" or any(d.startswith("cuda") for d in self.devices)):
            count = torch.cuda.device_count()
            if w > count:
                return f"world_size={w} needs {w} CUDA devices, but {count} {'is' if count == 1 else 'are'} available"
        if processes.launched():
            import os

            launched = int(os.environ["WORLD_SIZE"])
            if launched != w:
                return f"world_size={w}, but the launcher started {launched} ranks (WORLD_SIZE={launched})"
        for label, given, count in (
            ("placements", self.placements, len(self.names)),
            ("out_placements", self.out_placements, None),
            ("grad_placements", self.grad_placements, len(self.names)),
        ):
            if count is not None and len(given) != count:
                return f"{label} has {len(given)} entries for {count} inputs ({', '.join(self.names)}): give one per input"
            for k, placement in enumerate(given):
                if not isinstance(placement, (Shard, Replicate, Partial)):
                    return f"{label}[{k}] is {placement!r}: use torch.distributed.tensor's Shard(d), Replicate() or Partial()"
        for name, placement, grad in zip(self.names, self.placements, self.grad_placements):
            if isinstance(placement, Partial):
                return f"input `{name}` is placed Partial(): inputs are Shard(d) or Replicate(); Partial() is for outputs and gradients"
            value = self.params.get(name, self.data.get(name))
            if callable(value) and not isinstance(value, torch.Tensor):  # a generator of the input
                value = value(generator(0))
            if value is None or not isinstance(value, torch.Tensor):
                if isinstance(placement, Shard) or isinstance(grad, Shard):
                    return f"input `{name}` is not a tensor: only Replicate() can place it"
                continue
            for role, p in (("placements", placement), ("grad_placements", grad)):
                if isinstance(p, Shard):
                    problem = _shard_problem(name, role, p, tuple(value.shape), w)
                    if problem:
                        return problem
        return None

    # --- running on the ranks ---------------------------------------------------------------

    def _ranks(self) -> processes.Forked | processes.Launched:
        if self.ranks is None or self.ranks.closed:
            if processes.launched():
                processes.join_launched_group()
                self.ranks = processes.Launched(self.serve, self.key)
            else:
                _close_others(self)
                self.ranks = processes.Forked(self.serve, self.world_size, self.timeout, self.backend or "gloo")
                _OPEN.add(self)
        return self.ranks

    def close(self) -> None:
        """Stop this check's ranks (they start again on the next use)."""
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None
        _OPEN.discard(self)

    def _ask(self, request: dict[str, Any]) -> list[Any]:
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in request["args"])
        if on_cuda and not processes.launched():
            raise CaseError(
                "forked ranks cannot use CUDA once this process has: to check on GPUs, run under a launcher "
                f"(torchrun --nproc_per_node={self.world_size} -m backprop_check run FILE)"
            )
        try:
            return self._ranks().ask(request)
        except processes.RankError as exc:
            raise CaseError(str(exc)) from None

    def _invoke(self, values: Any) -> Any:
        args = [values[n] if n in values else self.constants[n] for n in self.names]
        outputs = _OnRanks.apply(self, *args)
        return outputs[0] if self.single_output else tuple(outputs)

    def run_forward(
        self, args: Sequence[Any], rows: int | None = None, batched: Sequence[bool] = (), replicas_agree: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """The global outputs of `fn` at `args` (with `rows`: a batch of them, stacked). Without
        `replicas_agree` (some input `PerRank`), a `Replicate()` output is the ranks' mean."""
        answers = self._ask({"kind": "forward", "args": list(args), "rows": rows, "batched": list(batched)})
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        answers = [(single, [o.to(device) for o in outputs]) for single, outputs in answers]
        if rows is None:
            return self._assemble_outputs([a[1] for a in answers], answers[0][0], replicas_agree)
        per_row = [
            self._assemble_outputs([[o[b] for o in a[1]] for a in answers], answers[0][0], replicas_agree)
            for b in range(rows)
        ]
        return tuple(torch.stack([row[k] for row in per_row]) for k in range(len(per_row[0])))

    def _assemble_outputs(
        self, local: list[list[torch.Tensor]], single: bool, replicas_agree: bool = True
    ) -> tuple[torch.Tensor, ...]:
        self.single_output = single
        count = len(local[0])
        placements = self.out_placements
        if len(placements) != count:
            raise CaseError(
                f"{self.label} returns {count} output{'s' * (count != 1)}, but out_placements has "
                f"{len(placements)} entr{'ies' if len(placements) != 1 else 'y'}: give one per output"
            )
        Shard, Replicate, Partial = _placement_classes()
        outputs = []
        for k, placement in enumerate(placements):
            parts = [rank_outputs[k] for rank_outputs in local]
            if isinstance(placement, Shard):
                outputs.append(torch.cat(parts, dim=placement.dim))
            elif isinstance(placement, Partial):
                outputs.append(torch.stack(parts).sum(0))
            elif not replicas_agree:
                outputs.append(torch.stack(parts).mean(0))
            else:
                outputs.append(parts[0])
                for rank, part in enumerate(parts[1:], 1):
                    where = _first_difference(part, parts[0])
                    if where is not None:
                        raise CaseError(
                            f"output {k} is placed Replicate(), but rank {rank}'s differs from rank 0's at "
                            f"{list(where)} ({float(part[where]):.8g} vs {float(parts[0][where]):.8g}): all-reduce it "
                            "in the forward, or declare Partial() if the ranks' outputs sum to it"
                        )
        return tuple(outputs)

    def run_backward(self, args: Sequence[Any], cotangents: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Each differentiated input's global gradient from the ranks' backward with cotangents
        v (global, sharded like the outputs), assembled by `grad_placements`."""
        answers = self._ask({"kind": "backward", "args": list(args), "cotangents": list(cotangents)})
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        answers = [{name: g.to(device) for name, g in answer.items()} for answer in answers]
        self.recent = (self.recent + [([_plain(a) for a in args], answers)])[-KEPT:]
        Shard, Replicate, Partial = _placement_classes()
        gradients = {}
        for name, placement in zip(self.names, self.grad_placements):
            if name not in self.wrt:
                continue
            parts = [answer[name] for answer in answers]
            if isinstance(placement, Shard):
                gradients[name] = torch.cat(parts, dim=placement.dim)
            elif isinstance(placement, Partial):
                gradients[name] = torch.stack(parts).sum(0)
            else:  # every rank's copy is checked against rank 0's in rank_checks
                gradients[name] = parts[0]
        return gradients

    def serve(self, request: dict[str, Any], rank: int, world_size: int) -> Any:
        """On one rank: `fn` on this rank's shards (a forward, a batch of them, or a backward);
        what it answers is on the CPU, for the driver to place."""
        args = _on_rank_device([a.values[rank] if isinstance(a, PerRank) else a for a in request["args"]], rank)
        request = {**request, "cotangents": _on_rank_device(request.get("cotangents") or [], rank)}
        found = self._serve(request, args, rank, world_size)
        if isinstance(found, dict):
            return {name: g.cpu() for name, g in found.items()}
        single, outputs = found
        return single, [o.cpu() for o in outputs]

    def _serve(self, request: dict[str, Any], args: list[Any], rank: int, world_size: int) -> Any:
        if request["kind"] == "forward":
            with torch.no_grad():
                if request["rows"] is None:
                    return self._local_call(self._shards(args, rank))
                rows = []
                single = True
                for b in range(request["rows"]):
                    row = [a[b] if batched else a for a, batched in zip(args, request["batched"])]
                    single, outputs = self._local_call(self._shards(row, rank))
                    rows.append(outputs)
                # one tensor per output, its rows stacked: one array each to send back
                return single, [torch.stack([row[k] for row in rows]) for k in range(len(rows[0]))]
        local = self._shards(args, rank)
        leaves = {}
        for k, name in enumerate(self.names):
            if name in self.wrt:
                local[k] = leaves[name] = local[k].detach().requires_grad_(True)
        with torch.enable_grad():
            _, outputs = self._local_call(local)
        pairs = []
        for k, (output, v) in enumerate(zip(outputs, request["cotangents"])):
            if v is None or not output.requires_grad:
                continue
            pairs.append((output, _shard(v, self.out_placements[k], rank, world_size)))
        grads: Sequence[torch.Tensor | None] = [None] * len(leaves)
        if pairs:
            try:
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], list(leaves.values()), [v.to(o.dtype) for o, v in pairs], allow_unused=True
                )
            except CaseError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch's RuntimeError, or anything the backward raises
                raise CaseError(f"the backward raised {one_line(exc)}{raised_at(exc)}") from exc
        return {
            name: (g if g is not None else torch.zeros_like(leaf)).detach()
            for (name, leaf), g in zip(leaves.items(), grads)
        }

    def _shards(self, args: Sequence[Any], rank: int) -> list[Any]:
        return [_shard(a, p, rank, self.world_size) if isinstance(a, torch.Tensor) else a for a, p in zip(args, self.placements)]

    def _local_call(self, local: list[Any]) -> tuple[bool, list[torch.Tensor]]:
        try:
            returned = self._apply(self.fn, local)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise anything
            line = line_in(self.file, exc)
            raise CaseError(f"{self.label} raised {one_line(exc)}" + (f" (line {line})" if line else "")) from exc
        single = not isinstance(returned, (tuple, list))
        outputs = [returned] if single else list(returned)
        for k, output in enumerate(outputs):
            if not isinstance(output, torch.Tensor):
                raise CaseError(f"output {k} of {self.label} is {type(output).__name__}, not a tensor")
        return single, outputs

    # --- the diagnosis ----------------------------------------------------------------------

    def rank_checks(
        self, point: Point, device: str, dtype: torch.dtype, checks: list[Check], tol: Tolerance,
        numerical: Gradients | None = None, diagnose: bool = True,
    ) -> list[Check]:
        """Per rank: every replica of a `Replicate()` gradient against rank 0's, and for each
        wrong input the rank, the element (global and local) and, where `diagnose`, the likely
        slip, told from the referee's own estimates at this point (`numerical`) where it has
        enough of them. Without `diagnose` (an earlier point's failure is the one shown) no
        estimate is made: each of its rows costs the ranks a collective's latency."""
        locals_ = self._locals_at(point, device, dtype)
        found: list[Check] = []
        if locals_ is not None:
            for check in checks:
                if check.kind == CheckKind.PARAM and check.verdict == MISMATCH and check.index is not None:
                    if check.name in self.wrt:
                        found.append(self._rank_check(check, point, device, dtype, locals_, tol, numerical, diagnose))
            # The most specific slip first: a rank-order slip also looks right under .sum() (v's
            # chunks are all ones), so it speaks for the input that shows it.
            found.sort(key=lambda c: "rank-order" not in (c.note or ""))
            found.extend(self._replica_checks(locals_, tol))
        if self.global_reference is not None:
            found.extend(self._reference_checks(point, device, dtype, locals_, tol))
        return found + outputs.extra_checks(self, point, device, dtype, checks, tol)

    # --- the reference: a single-process function of the global inputs -----------------------

    def _reference_checks(
        self, point: Point, device: str, dtype: torch.dtype, locals_: list[dict[str, torch.Tensor]] | None, tol: Tolerance
    ) -> list[Check]:
        """The reference's float64 outputs against the ranks' assembled ones, and its float64
        autograd gradient (Jᵀv, the same v) against the ranks'; where the gradients disagree, the
        numerical referee at those elements names the odd one out (a wrong distributed backward
        is already a mismatch of autograd: only a wrong reference is added here)."""
        at = point.rounded(dtype)  # where the run and its referee are: the point rounded to dtype
        values = {**at.params, **at.data}
        args = [values[n].detach().requires_grad_(n in self.wrt) if n in values else self.constants[n] for n in self.names]
        label = f"reference {getattr(self.global_reference, '__name__', 'function')}"
        try:
            with torch.enable_grad():
                returned = self.global_reference(*args)  # type: ignore[misc]
                outputs = list(returned) if isinstance(returned, (tuple, list)) else [returned]
                terms = [
                    (v * outputs[k]).sum() for k, v in ((k, values[c]) for k, c in self.cotangents.items()) if k < len(outputs)
                ]
                leaves = [a for n, a in zip(self.names, args) if n in self.wrt]
                grads = torch.autograd.grad(sum(terms), leaves, allow_unused=True)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            line = line_in(self.file, exc)
            raise CaseError(f"{label} raised {one_line(exc)}" + (f" (line {line})" if line else "")) from exc
        found = []
        with torch.no_grad():
            ranks_out = self._call(point.cast(dtype, device).params | point.cast(dtype, device).data)
        for k, (mine, theirs) in enumerate(zip(ranks_out, outputs)):
            theirs = theirs.detach()
            if tuple(mine.shape) != tuple(theirs.shape):
                raise CaseError(f"output {k}: the ranks assemble shape {list(mine.shape)}, {label} returns {list(theirs.shape)}")
            where = _beyond(mine.double(), theirs.double(), tol)
            if where is not None:
                a, r = float(mine[where]), float(theirs[where])
                found.append(_note_check(
                    f"output {k} vs reference", tuple(mine.shape), None,
                    f"the ranks' output {k} (assembled by {describe_placement(self.out_placements[k])}) is {a:.8g} at "
                    f"{list(where)}, {label}'s is {r:.8g}: the distributed function does not compute the reference's",
                ))
        if locals_ is None:
            return found
        from backprop_check.sources.numerical import FiniteDifferences

        differences: FiniteDifferences | None = None
        for name, grad in zip([n for n in self.names if n in self.wrt], grads):
            ref = (grad if grad is not None else torch.zeros_like(values[name])).detach().double().reshape(-1)
            ours = self._assemble_local(name, [a[name] for a in locals_]).double().reshape(-1)
            allowed = tol.between(ours, ref, torch.zeros_like(ref), float(ref.abs().max()) if ref.numel() else 0.0)
            disputed = ((ours - ref).abs() > allowed).nonzero().reshape(-1)[:8]
            if not disputed.numel():
                continue
            differences = differences or FiniteDifferences(self, point, dtype)
            estimate = differences.estimate([name], {name: disputed})[name]
            n, e = estimate["value"], estimate["error"]
            off = (ref[disputed] - n).abs() > ERROR_BARS * e + max(tol.rtol, 1e-7) * n.abs()
            if not bool(off.any()):
                continue  # the reference agrees with the referee: autograd's mismatch says the rest
            j = int(off.nonzero()[0, 0])
            flat = int(disputed[j])
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), values[name].shape))
            found.append(_note_check(
                f"{name} vs reference", tuple(values[name].shape), Culprit.REFERENCE,
                f"{label}'s float64 gradient of `{name}` at {list(index)} is {float(ref[flat]):.8g}, the numerical "
                f"{float(n[j]):.8g} ± {float(e[j]):.2g} and the ranks' autograd {float(ours[flat]):.8g}: the "
                "reference is the odd one out",
                reference=float(ref[flat]), numerical=float(n[j]), autograd=float(ours[flat]),
            ))
        return found

    def _locals_at(self, point: Point, device: str, dtype: torch.dtype) -> list[dict[str, torch.Tensor]] | None:
        at = point.cast(dtype, device)
        values = {**at.params, **at.data}
        wanted = [values.get(n, self.constants.get(n)) for n in self.names]
        for args, answers in reversed(self.recent):
            if all(_same_value(a, b) for a, b in zip(args, wanted)):
                return answers
        return None

    def _replica_checks(self, locals_: list[dict[str, torch.Tensor]], tol: Tolerance) -> list[Check]:
        Shard, Replicate, Partial = _placement_classes()
        found = []
        for name, placement in zip(self.names, self.grad_placements):
            if name not in self.wrt or not isinstance(placement, Replicate):
                continue
            first = locals_[0][name].double()
            for rank, answer in enumerate(locals_[1:], 1):
                other = answer[name].double()
                allowed = tol.between(first, other, torch.zeros_like(first), float(first.abs().max()) if first.numel() else 0.0)
                gap = (other - first).abs() - allowed
                if first.numel() == 0 or float(gap.max()) <= 0:
                    continue
                index = tuple(int(i) for i in torch.unravel_index(gap.argmax(), first.shape))
                a, b = float(other[index]), float(first[index])
                bad = int((gap > 0).sum())
                found.append(Check(
                    name=f"{name} on rank {rank}",
                    kind=CheckKind.OUTPUT,
                    shape=tuple(first.shape),
                    verdict=MISMATCH,
                    culprit=Culprit.AUTOGRAD,
                    autograd=a,
                    abs_err=abs(a - b),
                    allowed=float(allowed[index]),
                    ratio=abs(a - b) / float(allowed[index]) if float(allowed[index]) > 0 else float("inf"),
                    bad=bad,
                    size=first.numel(),
                    note=(
                        f"the replicas disagree: `{name}`'s gradient is declared Replicate() (every rank holds the "
                        f"whole, reduced gradient), but at {list(index)} rank {rank} has {a:.8g} and rank 0 has "
                        f"{b:.8g} ({bad} of {first.numel()} elements differ): a rank reduced differently, or "
                        "the gradient was never reduced (declare grad_placements=Partial() if an optimizer or a "
                        "DDP hook reduces it later)"
                    ),
                ))
        return found

    def _rank_check(
        self, check: Check, point: Point, device: str, dtype: torch.dtype, locals_: list[dict[str, torch.Tensor]],
        tol: Tolerance, numerical: Gradients | None = None, diagnose: bool = True,
    ) -> Check:
        name = check.name
        k = self.names.index(name)
        placement, grad = self.placements[k], self.grad_placements[k]
        index = tuple(check.index or ())
        owners, local_index = _owners(grad, index, tuple(check.shape), self.world_size)
        true = check.numerical if check.numerical is not None else float("nan")
        if len(owners) == 1:
            rank = owners[0]
            whose = f"rank {rank}, element {list(local_index)} of its shard ({describe_placement(grad)})"
        else:
            wrong = [r for r in owners if abs(float(locals_[r][name][index]) - true) > check.allowed]
            rank = (wrong or owners)[0]
            kind = "sum over the ranks" if _is_partial(grad) else "copy on every rank"
            listed = f"rank{'s' * (len(wrong) != 1)} {', '.join(str(r) for r in wrong)}" if wrong else "the ranks together"
            whose = f"{listed} ({describe_placement(grad)}: the gradient is the {kind})"
        slip = self._slip(name, point, device, dtype, locals_, tol, rank, numerical) if diagnose else None
        if slip is None and diagnose:
            parts = self._parts_slip(name, point, dtype, locals_, tol, rank)
            if parts is not None:
                slip, rank = parts
        values = f"autograd {check.autograd:.8g}, numerical {true:.8g} ± {check.error_bar or 0.0:.2g}"
        note = (
            f"input `{name}` (placed {describe_placement(placement)}) at element {list(index)} of the global "
            f"gradient, held by {whose}: {values}"
        )
        if slip:
            note += f"; {LIKELY_SLIP}{slip}"
        return Check(
            name=f"{name} on rank {rank}",
            kind=CheckKind.OUTPUT,
            shape=check.shape,
            verdict=MISMATCH,
            culprit=check.culprit,
            numerical=check.numerical,
            autograd=check.autograd,
            error_bar=check.error_bar,
            abs_err=check.abs_err,
            rel_err=check.rel_err,
            allowed=check.allowed,
            ratio=check.ratio,
            bad=check.bad,
            size=check.size,
            note=note,
            culprits=dict(check.culprits),
        )

    def _slip(
        self, name: str, point: Point, device: str, dtype: torch.dtype, locals_: list[dict[str, torch.Tensor]],
        tol: Tolerance, rank: int, numerical: Gradients | None = None,
    ) -> str | None:
        """The likely slip behind a wrong gradient of `name`, told from numerical estimates of
        (up to SLIP_ELEMENTS of) its elements: the referee's own at this point (`numerical`)
        where it has enough of them (SLIP_KNOWN), else a fresh estimate. Every row of an estimate runs the
        function on the ranks, a collective's latency each: at every point and dtype of a
        failing check, fresh estimates cost the ranks twice the check's own rows."""
        from backprop_check.sources import SOURCES
        from backprop_check.sources.numerical import FiniteDifferences

        k = self.names.index(name)
        grad = self.grad_placements[k]
        w = self.world_size
        size = locals_[0][name].numel() if not isinstance(grad, _placement_classes()[0]) else sum(a[name].numel() for a in locals_)
        gen = torch.Generator().manual_seed(0)
        known = _estimated(numerical, name, size)
        if known is not None and known.numel() >= min(SLIP_KNOWN, (size + 1) // 2):
            chosen = known[torch.randperm(known.numel(), generator=gen)[:SLIP_ELEMENTS]].sort().values
            truth = numerical.values[name].detach().to("cpu", torch.float64).reshape(-1)[chosen]  # type: ignore[union-attr]
            error = numerical.error[name].detach().to("cpu", torch.float64).reshape(-1)[chosen]  # type: ignore[union-attr]
        else:
            chosen = torch.randperm(size, generator=gen)[:SLIP_ELEMENTS].sort().values
            estimate = FiniteDifferences(self, point, dtype).estimate([name], {name: chosen})[name]
            truth, error = estimate["value"], estimate["error"]
        assembled = self._assemble_local(name, [a[name] for a in locals_]).double().reshape(-1)[chosen]
        # Agreement within the error bars plus a relative slack wide enough for float32 ranks.
        slack = max(tol.rtol, 1e-6)

        def close(values: torch.Tensor, target: torch.Tensor, bars: torch.Tensor = error) -> bool:
            scale = float(target.abs().max()) if target.numel() else 0.0
            return bool(((values - target).abs() <= ERROR_BARS * bars + slack * (target.abs() + scale)).all())

        if w > 1 and bool((truth.abs() > 0).any()):
            if close(assembled, w * truth):
                return (
                    f"the gradient is {w}× the true one ({w} = the world size): it is counted once per rank, "
                    "an all-reduce done twice (in the forward's backward and again after), or a sum over ranks "
                    "of a gradient every rank already held whole"
                )
            if close(assembled, truth / w):
                return (
                    f"the gradient is 1/{w} of the true one ({w} = the world size): an average over ranks "
                    "(all-reduce then divide by the world size) where a sum belongs"
                )
        Shard, Replicate, Partial = _placement_classes()
        if isinstance(grad, Replicate) and w > 1:
            summed = torch.stack([a[name].double() for a in locals_]).sum(0).reshape(-1)[chosen]
            if close(summed, truth):
                return (
                    f"each rank's gradient of `{name}` is only its own part, and the ranks' parts sum to the "
                    "true gradient: an all-reduce is missing in the backward, or declare "
                    "grad_placements=Partial() if an optimizer or a DDP hook reduces it later"
                )
        if isinstance(grad, Shard) and w > 1:
            full = torch.full((size,), float("nan"), dtype=torch.float64)
            full[chosen] = truth
            bars = torch.full((size,), float("nan"), dtype=torch.float64)
            bars[chosen] = error
            shape = self._assemble_local(name, [a[name] for a in locals_]).shape
            chunks = full.reshape(shape).chunk(w, dim=grad.dim)
            bar_chunks = bars.reshape(shape).chunk(w, dim=grad.dim)
            mine = locals_[rank][name].double()
            own = ~torch.isnan(chunks[rank])
            holds_own = bool(own.any()) and close(mine[own], chunks[rank][own], bar_chunks[rank][own])
            if bool(own.any()) and bool((chunks[rank][own].abs() > 0).any()):
                for factor, said in ((w, f"{w}×"), (1 / w, f"1/{w} of")):
                    if close(mine[own], factor * chunks[rank][own], factor * bar_chunks[rank][own]):
                        return (
                            f"rank {rank}'s chunk of the gradient is {said} the true one ({w} = the world size), "
                            "while the gradient as a whole is not: this rank reduces (or averages) what it should not"
                        )
                truth_own = chunks[rank][own]
                fitted = float((mine[own] * truth_own).sum() / (truth_own * truth_own).sum())
                if abs(fitted - 1) > 1e-3 and close(mine[own], fitted * truth_own, abs(fitted) * bar_chunks[rank][own]):
                    return (
                        f"rank {rank}'s chunk of the gradient is {fitted:.4g}× the true one: a factor applied on this "
                        "rank (a rank-dependent scale, or a branch on the rank)"
                    )
            for other in range(w):
                seen = ~torch.isnan(chunks[other])
                if other == rank or holds_own or not bool(seen.any()):
                    continue
                if close(mine[seen], chunks[other][seen], bar_chunks[other][seen]):
                    return (
                        f"rank {rank} holds rank {other}'s chunk of the gradient: a rank-order slip (a backward "
                        "that takes the wrong slice, e.g. an all-gather's backward not taking this rank's part)"
                    )
        # Right under a .sum() loss? The backward and the referee again with every cotangent 1.
        ones = {label: torch.ones_like(point.data[label]) for label in self.cotangents.values() if label in point.data}
        if ones:
            at_ones = replace(point, data={**point.data, **ones})
            under_sum = SOURCES["autograd"](self, at_ones, device, dtype).values[name].double().reshape(-1)[chosen]
            again = FiniteDifferences(self, at_ones, dtype).estimate([name], {name: chosen})[name]
            if close(under_sum, again["value"], again["error"]):
                return (
                    "the backward is right under a .sum() loss (grad_output = 1) but not for a random grad_output: "
                    "it ignores grad_output, or multiplies it in the wrong place or layout"
                )
        return None

    def _parts_slip(
        self, name: str, point: Point, dtype: torch.dtype, locals_: list[dict[str, torch.Tensor]], tol: Tolerance, rank: int
    ) -> tuple[str, int] | None:
        """The rank whose part a replicated input's wrong gradient leaves out, counts twice or
        scales, and the likely slip; None where the parts do not tell.

        A `Replicate()` input's gradient is the sum over the ranks of each rank's part, the
        derivative through its own replica (the replicas move together). Each part is estimated
        along PART_DIRECTIONS random directions by moving one rank's replica alone (`PerRank`;
        a `Replicate()` output is then the ranks' mean), all in one batched request, and the
        gradient's own projections are matched against the parts summed with one rank's part
        scaled by a fitted factor (0: a rank that feeds zeros, or nothing, to an all-reduce; 2: one
        that adds its part twice), or with several ranks' parts left out. A hypothesis is named
        only where it is the one that fits within the error bars."""
        from backprop_check.sources.stencil import OFFSETS, _estimates, steps_for

        Shard, Replicate, Partial = _placement_classes()
        w = self.world_size
        k = self.names.index(name)
        if not (1 < w <= PART_RANKS) or not isinstance(self.placements[k], Replicate) or isinstance(self.grad_placements[k], Shard):
            return None
        at = point.rounded(dtype)
        values = {**at.params, **at.data}
        args = [values[n] if n in values else self.constants[n] for n in self.names]
        x = args[k]
        if not isinstance(x, torch.Tensor) or not x.numel() or not x.is_floating_point() or not self.cotangents:
            return None
        if w * w * PART_DIRECTIONS * len(OFFSETS) * x.numel() > PART_ELEMENTS:  # every rank's rows, for each rank
            return None
        gen = torch.Generator().manual_seed(0)
        directions = torch.randint(0, 2, (PART_DIRECTIONS, *x.shape), generator=gen).to(x) * 2 - 1  # |dᵢ| = 1
        largest = float(x.abs().max())
        h = float(steps_for(torch.tensor(largest, dtype=torch.float64)))
        moves = torch.tensor(OFFSETS, dtype=x.dtype).reshape(1, -1, *[1] * x.dim()) * h * directions[:, None]
        count = w * PART_DIRECTIONS * len(OFFSETS)  # rows by (moved rank, direction, offset)
        replicas = []
        for r in range(w):
            rows = x.expand(w, PART_DIRECTIONS, len(OFFSETS), *x.shape).clone()
            rows[r] += moves
            replicas.append(rows.reshape(count, *x.shape))
        moved = [PerRank(tuple(replicas)) if n == name else a for n, a in zip(self.names, args)]

        def loss(outputs: Sequence[torch.Tensor], batch: int | None) -> torch.Tensor:
            terms = [
                (values[label].double() * outputs[j].double()).reshape(batch or 1, -1).sum(1)
                for j, label in self.cotangents.items() if j < len(outputs)
            ]
            return torch.stack(terms).sum(0)

        f0 = loss(self.run_forward(args), None)
        f = loss(self.run_forward(moved, rows=count, batched=[n == name for n in self.names], replicas_agree=False), count)
        columns = w * PART_DIRECTIONS
        found = _estimates(
            f.reshape(columns, len(OFFSETS)).T, torch.full((columns,), h, dtype=torch.float64), float(f0[0]),
            theta=torch.full((columns,), largest, dtype=torch.float64),
        )
        if bool(found["kink"].any()) or not bool(torch.isfinite(found["error"]).all()):
            return None
        parts, bars = found["value"].reshape(w, -1), found["error"].reshape(w, -1)  # (ranks, directions)
        mine = self._assemble_local(name, [a[name] for a in locals_]) if _is_partial(self.grad_placements[k]) else locals_[rank][name]
        seen = (mine.double() * directions).reshape(PART_DIRECTIONS, -1).sum(1)
        slack = max(tol.rtol, 1e-6)

        def fits(c: torch.Tensor) -> bool:
            c = c.reshape(-1, 1)
            predicted = (c * parts).sum(0)
            allowed = ERROR_BARS * (c.abs() * bars).sum(0) + slack * (seen.abs() + (c.abs() * parts.abs()).sum(0))
            return bool(((predicted - seen).abs() <= allowed).all())

        ones = torch.ones(w, dtype=torch.float64)
        if fits(ones):
            return None
        left = seen - parts.sum(0)
        hypotheses: list[tuple[torch.Tensor, list[int], float]] = []
        for r in range(w):
            norm = float((parts[r] ** 2).sum())
            if norm == 0:
                continue
            factor = 1 + float((left * parts[r]).sum()) / norm
            for said in (round(factor), factor):  # a whole factor (0, 2) where it fits as well
                c = ones.clone()
                c[r] = said
                if fits(c):
                    hypotheses.append((c, [r], float(said)))
                    break
        from itertools import combinations

        for size in range(2, w):
            for missing in combinations(range(w), size):
                c = ones.clone()
                c[list(missing)] = 0
                if fits(c):
                    hypotheses.append((c, list(missing), 0.0))
        if len(hypotheses) != 1:
            return None
        _, ranks, factor = hypotheses[0]
        listed = ", ".join(str(r) for r in ranks)
        whose = f"rank {listed}'s part" if len(ranks) == 1 else f"the parts of ranks {listed}"
        head = (
            f"`{name}`'s gradient is the sum of the ranks' parts (each rank's part: the derivative through its own "
            "replica, estimated by moving it alone) "
        )
        if factor == 0:
            text = head + (
                f"without {whose}: rank{'s' * (len(ranks) > 1)} {listed} add{'s' * (len(ranks) == 1)} nothing to the "
                "all-reduce (zeros fed in, or the part dropped before the reduction)"
            )
        elif factor == 2:
            text = head + f"with {whose} counted twice: rank {listed} adds its part to the all-reduce twice"
        elif factor == -1:
            text = head + f"with {whose} negated: rank {listed} flips its part's sign before the all-reduce"
        else:
            text = head + f"with {whose} times {factor:.4g}: rank {listed} scales its part before the all-reduce"
        return text, ranks[0]

    def _assemble_local(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        Shard, Replicate, Partial = _placement_classes()
        grad = self.grad_placements[self.names.index(name)]
        if isinstance(grad, Shard):
            return torch.cat(parts, dim=grad.dim)
        if isinstance(grad, Partial):
            return torch.stack(parts).sum(0)
        return parts[0]


class _OnRanks(torch.autograd.Function):
    """The global function as one autograd node: its forward runs on the ranks, its backward
    is the ranks' backward, and under vmap a whole batch of inputs is one request."""

    @staticmethod
    def forward(case: DistributedCase, *args: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        if any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args):
            # the incremental replay's traced values: the ranks run elsewhere, nothing to record
            raise RuntimeError("the distributed forward runs on other processes: it cannot be recorded")
        return case.run_forward([a.detach() if isinstance(a, torch.Tensor) else a for a in args])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        case, *args = inputs
        ctx.case = case
        ctx.args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        ctx.shapes = [tuple(o.shape) for o in output]
        ctx.dtypes = [o.dtype for o in output]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        case: DistributedCase = ctx.case
        cotangents = [
            g.detach() if g is not None else torch.zeros(s, dtype=d) for g, s, d in zip(grads, ctx.shapes, ctx.dtypes)
        ]
        gradients = case.run_backward(ctx.args, cotangents)
        return (None, *[gradients.get(name) for name in case.names])

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], case: DistributedCase, *args: Any) -> tuple[Any, Any]:
        dims = in_dims[1:]
        moved = [a.movedim(d, 0) if d is not None else a for a, d in zip(args, dims)]
        outputs = case.run_forward(moved, rows=info.batch_size, batched=[d is not None for d in dims])
        return outputs, tuple(0 for _ in outputs)


def _on_rank_device(values: list[Any], rank: int) -> list[Any]:
    """CUDA tensors onto this rank's own GPU (under a launcher, `LOCAL_RANK`)."""
    if not any(isinstance(v, torch.Tensor) and v.is_cuda for v in values):
        return list(values)
    import os

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    return [v.to(device) if isinstance(v, torch.Tensor) and v.is_cuda else v for v in values]


def _note_check(name: str, shape: tuple[int, ...], culprit: Culprit | None, note: str, **values: float) -> Check:
    return Check(name=name, kind=CheckKind.OUTPUT, shape=shape, verdict=MISMATCH, culprit=culprit, note=note, ratio=float("inf"), **values)


def _beyond(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> tuple[int, ...] | None:
    """The worst element where two outputs differ beyond the tolerance, or None."""
    allowed = tol.between(a, b, torch.zeros_like(a), float(b.abs().max()) if b.numel() else 0.0)
    gap = (a - b).abs() - allowed
    if not gap.numel() or float(gap.max()) <= 0:
        return None
    return tuple(int(i) for i in torch.unravel_index(gap.argmax(), a.shape))


def _shard_problem(name: str, role: str, placement: Any, shape: tuple[int, ...], world_size: int) -> str | None:
    dim = placement.dim
    if not -len(shape) <= dim < max(1, len(shape)) or not shape:
        return f"input `{name}` has shape {list(shape)}: {role} Shard({dim}) names no dimension of it"
    size = shape[dim]
    if size % world_size:
        return (
            f"input `{name}` has {size} elements along dimension {dim} (shape {list(shape)}), which "
            f"{role} Shard({dim}) cannot split evenly over {world_size} ranks"
        )
    return None


def _shard(value: torch.Tensor, placement: Any, rank: int, world_size: int) -> torch.Tensor:
    Shard = _placement_classes()[0]
    if isinstance(placement, Shard):
        return value.chunk(world_size, dim=placement.dim)[rank].contiguous()
    return value


def _estimated(numerical: Gradients | None, name: str, size: int) -> torch.Tensor | None:
    """The flat elements of `name` the referee estimated as a smooth function's derivative with
    a finite bar (not on a kink, not unresolved), or None where it has no values of `name`."""
    if numerical is None or name not in numerical.values or name not in numerical.error:
        return None
    values = numerical.values[name].detach().to("cpu", torch.float64).reshape(-1)
    if values.numel() != size:
        return None
    good = torch.isfinite(values) & torch.isfinite(numerical.error[name].detach().to("cpu", torch.float64).reshape(-1))
    for mask in (numerical.checked.get(name), ~numerical.kink[name] if name in numerical.kink else None,
                 ~numerical.unresolved[name].bool() if name in numerical.unresolved else None):
        if mask is not None:
            good &= mask.detach().cpu().reshape(-1).bool()
    return good.nonzero().reshape(-1)


def _owners(placement: Any, index: tuple[int, ...], shape: tuple[int, ...], world_size: int) -> tuple[list[int], tuple[int, ...]]:
    """The ranks holding global element `index` under `placement`, and its index in their shard."""
    Shard = _placement_classes()[0]
    if isinstance(placement, Shard) and index:
        dim = placement.dim % len(shape)
        chunk = shape[dim] // world_size
        local = list(index)
        local[dim] = index[dim] % chunk
        return [index[dim] // chunk], tuple(local)
    return list(range(world_size)), index


def _is_partial(placement: Any) -> bool:
    return isinstance(placement, _placement_classes()[2])


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    """Where two replicas of an output differ beyond the rounding of a reordered sum, or None."""
    if a.shape != b.shape:
        return ()
    if not (a.is_floating_point() or a.is_complex()):
        differs = a != b
    else:
        eps = torch.finfo(a.dtype if a.is_floating_point() else a.real.dtype).eps
        scale = float(b.abs().max()) if b.numel() else 0.0
        differs = (a - b).abs() > 64 * eps * (b.abs() + scale)
    if not bool(differs.any()):
        return None
    return tuple(int(i) for i in torch.unravel_index(differs.reshape(-1).nonzero()[0, 0], a.shape))


def _plain(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)


def under_launcher(paths: Sequence[str], run: Callable[[], int]) -> int:
    """`backprop-check run` on one rank of a launcher's group (torchrun): rank 0 runs the
    checks and writes the report; every other rank loads the same case files and serves rank 0's
    requests until it is done. The exit status is rank 0's."""
    from backprop_check.model.loader import load

    rank = processes.join_launched_group()
    if rank != 0:
        loaded = load(list(paths))  # registers the same checks, under the same keys (kept alive here)
        processes.serve(lambda key: REGISTRY[key].serve if key in REGISTRY else None)
        del loaded
        status = [0]
    else:
        try:
            status = [run()]
        finally:
            processes.stop_launched()
    torch.distributed.broadcast_object_list(status, src=0, group=processes._control_group())
    # Every rank is past the broadcast: the groups go down here, not in the interpreter's exit,
    # where a gloo thread still running aborts the process ("terminate called without an
    # active exception") under load.
    torch.distributed.destroy_process_group()
    return int(status[0])


# Checks whose ranks are running: one at a time (a new one stops the others), none at exit.
_OPEN: weakref.WeakSet[DistributedCase] = weakref.WeakSet()


def _close_others(keep: DistributedCase) -> None:
    for case in list(_OPEN):
        if case is not keep:
            case.close()


def close_all() -> None:
    """Stop the ranks of every distributed check (at exit, and at the end of a run)."""
    for case in list(_OPEN):
        case.close()


atexit.register(close_all)
