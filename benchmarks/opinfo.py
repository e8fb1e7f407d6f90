"""Conformance of the drop-in `gradcheck` against PyTorch's own operator suite (issue 21).

    .venv/bin/python benchmarks/opinfo.py [--ops sin,cumsum] [--limit N] [--samples 2]
        [--dtypes float64,float32,complex128] [--timeout 60] [--out opinfo.jsonl] [--budget SECONDS] [--mutants]

Every op of `torch.testing._internal.common_methods_invocations.op_db` that supports autograd
on the CPU, its first `--samples` samples (the ones `test/test_ops_gradients.py` gradchecks, built
as that test builds them: the inputs that require grad are gradcheck's inputs, the rest is
closed over), in float64 and float32 (and complex128 where `--dtypes` names it): torch's slow
gradcheck, torch's fast one and the drop-in, side by side, each under `--timeout` seconds in a
worker process (one that hangs is killed and replaced). `--mutants` adds the mutant phase: each
op wrapped in a Function whose backward is autograd's VJP plus one slip (every element ×1.01;
one element ×1.01; one element ×1.0001; one sign; one input's gradient zeroed; in complex128
also one element conjugated), in float64 and complex128 where `--dtypes` names them, where the
slip changes the gradient.

`--kind gradgradcheck` runs gradgradcheck instead, the drop-in's against torch's, on the ops
whose `supports_gradgrad` is set, with their `check_batched_gradgrad`; its mutants keep the
gradient's values and plant the slip in the backward's own derivative. `--kind forward` runs
gradcheck in forward mode (`check_forward_ad=True, check_backward_ad=False`, as
test_ops_gradients.py's forward-mode test does) on the ops whose `supports_forward_ad` is set;
its mutants plant the slip in a Function's `jvp` (see `slipped`). Give each kind an `--out` of
its own.

`--offset 1e3` moves every differentiated input by that much (a sample whose forward is not
finite there is left out): pixels, timestamps and shifted logits are far from zero, where a
finite-difference step set by |θ| may span a feature of the function (a staircase or a
sawtooth of period 1 reads as a line at every power-of-two step from 1 up). Mutants too.
`--scale 1e-5` multiplies them instead (before any offset): far below 1, where what a forward
computes from an input (cos x, exp x ≈ 1) rounds at a larger scale than the input itself.

Results go one line per check to `--out` (JSON lines); a rerun skips what is already there, so
the run can be cut in slices (`--budget` seconds each, `--ops`, `--limit`) and resumed. At the
end the table of the whole file is printed (`--table` prints it alone).
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "complex128": torch.complex128}
SLIPS = ("all×1.01", "one×1.01", "one×1.0001", "sign", "zeroed")
# A complex gradient has one slip more: one element conjugated (the Wirtinger convention's slip).
COMPLEX_SLIPS = (*SLIPS, "one conj")
# The dtypes mutants are planted in, where --dtypes names them.
MUTATED = ("float64", "complex128")
CHECKERS = ("torch-slow", "torch-fast", "dropin")
SCALE = 1.0  # `--scale`: every differentiated input multiplied by this much


def op_db() -> list[Any]:
    warnings.filterwarnings("ignore")
    from torch.testing._internal.common_methods_invocations import op_db as ops

    return [op for op in ops if op.supports_autograd]


def op_name(op: Any) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def samples(op: Any, dtype: torch.dtype, count: int) -> list[Any]:
    """The op's first `count` samples in `dtype`, drawn from a seeded generator (the same in
    every process)."""
    torch.manual_seed(0)
    found = []
    try:
        for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
            found.append(sample)
            if len(found) == count:
                break
    except Exception:  # noqa: BLE001 - an op whose samples fail in this dtype has no unit
        return found
    return found


def unit(op: Any, sample: Any) -> tuple[Callable[..., Any], tuple[torch.Tensor, ...]]:
    """fn and its inputs as test_ops_gradients.py gives them to gradcheck."""
    listed = isinstance(sample.input, (list, tuple))
    everything = [*(sample.input if listed else (sample.input,)), *sample.args, *sample.kwargs.values()]
    inputs = tuple(x for x in everything if isinstance(x, torch.Tensor) and x.requires_grad)

    def take(value: Any, it: Iterator[torch.Tensor]) -> Any:
        if isinstance(value, (list, tuple)) and value and all(isinstance(x, torch.Tensor) for x in value):
            return [next(it) if x.requires_grad else x for x in value]
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return next(it)
        return value

    def fn(*xs: torch.Tensor) -> Any:
        it = iter(xs)
        first = take(sample.input, it)
        args = [take(a, it) for a in sample.args]
        kwargs = {k: take(v, it) for k, v in sample.kwargs.items()}
        output = op.gradcheck_wrapper(op.get_op(), first, *args, **kwargs)
        return sample.output_process_fn_grad(output) if sample.output_process_fn_grad is not None else output

    fn.__name__ = op.name.replace(".", "_")
    fn.__qualname__ = fn.__name__
    return fn, inputs


KINDS = ("gradcheck", "gradgradcheck", "forward")


def keywords(op: Any, kind: str = "gradcheck") -> dict[str, Any]:
    if kind == "forward":
        return {
            "check_forward_ad": True,
            "check_backward_ad": False,
            "check_undefined_grad": False,
            "check_batched_grad": False,
            "check_batched_forward_grad": bool(op.check_batched_forward_grad),
            "nondet_tol": op.gradcheck_nondet_tol,
            "check_grad_dtypes": True,
        }
    return {
        "check_batched_grad": bool(op.check_batched_grad if kind == "gradcheck" else op.check_batched_gradgrad),
        "nondet_tol": op.gradcheck_nondet_tol,
        "check_grad_dtypes": True,
        "check_undefined_grad": True,
    }


def run_check(
    op: Any, dtype: torch.dtype, index: int, checker: str, slip: str | None, kind: str = "gradcheck", offset: float = 0.0
) -> dict[str, Any]:
    """One check in this process (of KINDS), its inputs moved by `offset`: its verdict and a
    line saying why."""
    from backprop_check import gradcheck, gradgradcheck
    from backprop_check.errors import CaseError

    found = samples(op, dtype, index + 1)
    if len(found) <= index:
        return {"verdict": "no-sample", "why": ""}
    fn, inputs = unit(op, found[index])
    if offset or SCALE != 1.0:
        inputs = tuple((x.detach() * SCALE + offset).requires_grad_(True) for x in inputs)
        try:
            with torch.no_grad():
                value = fn(*inputs)
            if not all(bool(torch.isfinite(t).all()) for t in (value if isinstance(value, (tuple, list)) else (value,))
                       if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())):
                return {"verdict": "no-sample", "why": "not finite there"}
        except Exception:  # noqa: BLE001 - outside the op's domain there
            return {"verdict": "no-sample", "why": "outside its domain there"}
    if slip is not None:
        fn = slipped(fn, inputs, slip, kind)
        if fn is None:
            return {"verdict": "no-mutant", "why": "the slip would not change the gradient"}
    options = keywords(op, kind)
    dropin = gradgradcheck if kind == "gradgradcheck" else gradcheck
    torch_check = torch.autograd.gradgradcheck if kind == "gradgradcheck" else torch.autograd.gradcheck
    started = time.perf_counter()
    try:
        if checker == "dropin":
            ok = dropin(fn, inputs, **options)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ok = torch_check(fn, inputs, fast_mode=checker == "torch-fast", **options)
        verdict, why = ("ok" if ok else "fail"), ""
    except importlib.import_module("torch.autograd.gradcheck").GradcheckError as exc:  # the drop-in's is a subclass
        verdict, why = "fail", " ".join(str(exc).split())[:300]
    except CaseError as exc:
        verdict, why = "error", str(exc).splitlines()[0][:300]
    except Exception as exc:  # noqa: BLE001 - torch's errors, and the drop-in's crashes
        verdict = "error" if checker != "dropin" else "crash"
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if checker == "dropin":
            why += " @ " + traceback.format_exc().strip().splitlines()[-3].strip()[:200]
    return {"verdict": verdict, "why": why, "seconds": round(time.perf_counter() - started, 6)}


def slipped(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], slip: str, kind: str = "gradcheck") -> Callable[..., Any] | None:
    """fn behind a Function whose backward is autograd's VJP with `slip` planted; None where
    the op has not one floating output or the slip cannot change its gradient. For
    gradgradcheck the backward is differentiable and the slip is in its derivative alone: the
    gradient's values stay exact (g + slip(g − g.detach()) adds zeros), the double backward is
    wrong. For forward mode the slip is in the Function's jvp (`jvp_slipped`)."""
    with torch.no_grad():
        out = fn(*inputs)
    if not isinstance(out, torch.Tensor) or not (out.dtype.is_floating_point or out.dtype.is_complex) or not out.numel():
        return None
    if out.layout != torch.strided or any(x.layout != torch.strided for x in inputs):
        return None  # sparse: neither checker differentiates it
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(fn(*leaves), leaves, g, allow_unused=True)
    live = [i for i, gr in enumerate(grads) if gr is not None and bool((gr != 0).any())]
    if not live:
        return None
    target = live[0]
    if slip == "one conj" and not (grads[target].is_complex() and _imaginary(grads[target])):
        return None  # a real gradient, or one with no imaginary part: conjugating changes nothing
    if kind == "forward":
        return jvp_slipped(fn, inputs, slip)

    def plant(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        g0 = grads[target]
        if g0 is None:
            return grads
        g0 = g0.clone(memory_format=torch.contiguous_format)  # reshape(-1) must be a view
        flat = g0.reshape(-1)
        where = int((flat.imag if slip == "one conj" else flat).detach().abs().argmax())
        if kind == "gradgradcheck":
            grads[target] = g0.detach() + second(g0 - g0.detach(), where)
            return grads
        if slip == "all×1.01":
            g0 = g0 * 1.01
        elif slip == "one×1.01":
            flat[where] = flat[where] * 1.01
        elif slip == "one×1.0001":
            flat[where] = flat[where] * 1.0001
        elif slip == "sign":
            flat[where] = -flat[where]
        elif slip == "zeroed":
            g0 = torch.zeros_like(g0)
        elif slip == "one conj":
            flat[where] = flat[where].conj()
        grads[target] = g0
        return grads

    def second(d: torch.Tensor, where: int) -> torch.Tensor:
        """The slip in d (zeros whose derivative is the gradient's)."""
        one = torch.zeros(d.numel(), dtype=torch.bool)
        one[where] = True
        one = one.reshape(d.shape)
        if slip == "all×1.01":
            return d * 1.01
        if slip == "zeroed":
            return d.detach()
        if slip == "one conj":
            return torch.where(one, d.conj(), d)
        factor = {"one×1.01": 1.01, "one×1.0001": 1.0001, "sign": -1.0}[slip]
        return torch.where(one, d * factor, d)

    class Slip(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *xs: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(*xs)
            return fn(*xs).clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            if kind == "gradgradcheck":  # through the saved inputs themselves, so that the double backward reaches them
                xs = list(ctx.saved_tensors)
                with torch.enable_grad():
                    found = torch.autograd.grad(fn(*xs), xs, grad, allow_unused=True, create_graph=True)
            else:
                xs = [x.detach().requires_grad_(True) for x in ctx.saved_tensors]
                with torch.enable_grad():
                    found = torch.autograd.grad(fn(*xs), xs, grad, allow_unused=True)
            return tuple(plant([g if g is not None else torch.zeros_like(x) for g, x in zip(found, xs)]))

    def wrapped(*xs: torch.Tensor) -> torch.Tensor:
        return Slip.apply(*xs)

    wrapped.__name__ = wrapped.__qualname__ = f"{getattr(fn, '__name__', 'op')}_slipped"
    return wrapped


def _imaginary(value: torch.Tensor) -> bool:
    """Whether conjugating the element with the largest imaginary part changes it beyond
    rounding (std of a complex tensor is real, its imaginary part rounding alone)."""
    return bool(value.imag.abs().max() > 1e-6 * value.abs().max())


def jvp_slipped(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], slip: str) -> Callable[..., Any] | None:
    """fn behind a Function whose jvp is fn's, with `slip` planted in the output's tangent; None
    where the op's jvp cannot be built that way or is zero. The jvp is two backward passes
    (the VJP's VJP: forward mode cannot nest inside a jvp), so the op needs a double backward."""

    def tangent(xs: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor | None]) -> torch.Tensor:
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in xs]
            out = fn(*leaves)
            w = torch.zeros_like(out, requires_grad=True)
            grads = torch.autograd.grad(out, leaves, w, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(grads, tangents) if g is not None and g.requires_grad and t is not None]
            found = torch.autograd.grad([g for g, _ in pairs], w, [t for _, t in pairs], allow_unused=True)[0] if pairs else None
        return torch.zeros_like(out) if found is None else found.detach()

    try:
        gen = torch.Generator().manual_seed(2)
        directions = [torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in inputs]
        probe = tangent(inputs, directions)
        with torch.autograd.forward_ad.dual_level():  # the op's own jvp, outside any jvp
            duals = [torch.autograd.forward_ad.make_dual(x.detach(), d) for x, d in zip(inputs, directions)]
            exact = torch.autograd.forward_ad.unpack_dual(fn(*duals)).tangent
    except Exception:  # noqa: BLE001 - no double backward or no forward AD: no mutant of this kind
        return None
    # The VJP's VJP is the jvp where fn is complex-differentiable (or real); a complex function
    # that is not (std, abs of complex input) has another: no mutant whose base is not the jvp.
    if exact is None or not torch.allclose(probe, exact, rtol=1e-9, atol=1e-12):
        return None
    if not bool((probe != 0).any()) or slip == "one conj" and not (probe.is_complex() and _imaginary(probe)):
        return None

    class Slip(torch.autograd.Function):
        @staticmethod
        def forward(*xs: torch.Tensor) -> torch.Tensor:
            return fn(*xs).clone()

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.save_for_forward(*inputs)

        @staticmethod
        def jvp(ctx: Any, *tangents: torch.Tensor | None) -> torch.Tensor:
            t = tangent(ctx.saved_tensors, tangents).clone(memory_format=torch.contiguous_format)
            flat = t.reshape(-1)
            where = int((flat.imag if slip == "one conj" else flat).abs().argmax())
            if slip == "all×1.01":
                return t * 1.01
            if slip == "zeroed":
                return torch.zeros_like(t)
            if slip == "one conj":
                flat[where] = flat[where].conj()
            else:
                flat[where] = flat[where] * {"one×1.01": 1.01, "one×1.0001": 1.0001, "sign": -1.0}[slip]
            return t

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> Any:
            raise RuntimeError("a forward-mode mutant has no backward")

    def wrapped(*xs: torch.Tensor) -> torch.Tensor:
        return Slip.apply(*xs)

    wrapped.__name__ = wrapped.__qualname__ = f"{getattr(fn, '__name__', 'op')}_jvp_slipped"
    return wrapped


# --- the worker pool ------------------------------------------------------------------------------


def _worker(conn: Any, ops: dict[str, Any]) -> None:
    # Forked: where the parent has started OpenMP's pool (`benchmarks/run.py`'s earlier sections),
    # the child's first parallel region waits on threads it does not have. One thread, set first,
    # never enters the pool (as the distributed check's forked ranks do).
    torch.set_num_threads(1)
    while True:
        task = conn.recv()
        if task is None:
            return
        name, dtype, index, checker, slip, kind, offset = task
        try:
            result = run_check(ops[name], DTYPES[dtype], index, checker, slip, kind, offset)
        except BaseException as exc:  # noqa: BLE001 - the harness around the check failed
            result = {"verdict": "crash", "why": f"runner: {type(exc).__name__}: {exc}"[:300]}
        conn.send(result)


class Worker:
    """One process that runs checks, killed and replaced when a check overruns its time."""

    def __init__(self, ops: dict[str, Any]) -> None:
        self.ops = ops
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, self.ops), daemon=True)
        self.process.start()

    def run(self, task: tuple[Any, ...], timeout: float) -> dict[str, Any]:
        self.conn.send(task)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        alive = self.process.is_alive()
        self.process.kill()
        self.process.join()
        self._start()
        return {"verdict": "timeout" if alive else "crash", "why": f">{timeout:g}s" if alive else "the worker died"}

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


def tasks(
    ops: Sequence[Any], dtypes: Sequence[str], count: int, mutants: bool, kind: str = "gradcheck", offset: float = 0.0
) -> Iterator[tuple[Any, ...]]:
    for op in ops:
        if kind == "gradgradcheck" and not op.supports_gradgrad or kind == "forward" and not op.supports_forward_ad:
            continue
        for dtype in dtypes:
            if DTYPES[dtype] not in op.supported_backward_dtypes("cpu"):
                continue
            for index in range(count):
                for checker in CHECKERS:
                    yield (op_name(op), dtype, index, checker, None, kind, offset)
        for dtype in MUTATED:
            if mutants and dtype in dtypes and DTYPES[dtype] in op.supported_backward_dtypes("cpu"):
                for index in range(count):
                    for slip in COMPLEX_SLIPS if DTYPES[dtype].is_complex else SLIPS:
                        yield (op_name(op), dtype, index, "dropin", slip, kind, offset)


def key(task: Sequence[Any]) -> str:
    """The row's key: op|dtype|index|checker|slip, then |gradgrad or |forward for those kinds and
    |+offset for an offset."""
    kind = {"gradcheck": "", "gradgradcheck": "|gradgrad", "forward": "|forward"}[task[5]]
    return "|".join(str(x) for x in task[:5]) + kind + (f"|+{task[6]:g}" if len(task) > 6 and task[6] else "")


def load(path: str) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    done[row["key"]] = row
    return done


def split(rows: dict[str, dict[str, Any]]) -> tuple[dict[tuple[str, str, int], dict[str, dict[str, Any]]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The units (op, dtype, sample) → checker → row; the mutants that count (a slip planted in
    a gradient torch's slow gradcheck passes in the mutant's dtype, and one the runner could build); the
    mutants of ops whose own gradient is wrong (as_strided_scatter: zeroing its wrong gradient
    can make it right), which say nothing about catching a slip."""
    units: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    planted = []
    for row in rows.values():
        if row["slip"] is None:
            units.setdefault((row["op"], row["dtype"], row["index"]), {})[row["checker"]] = row
        elif row["verdict"] not in ("no-mutant", "no-sample") and not row["why"].startswith("runner:"):
            planted.append(row)
    right = [m for m in planted if units.get((m["op"], m["dtype"], m["index"]), {}).get("torch-slow", {}).get("verdict") == "ok"]
    return units, right, [m for m in planted if m not in right]


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The conformance table: per dtype, the drop-in's verdicts where torch slow passes and
    where it fails; then the mutants."""
    units, mutants, _ = split(rows)
    lines = ["| dtype | torch slow | units | drop-in ok | fail | error | crash | timeout | torch fast ok |", "|---|---|---|---|---|---|---|---|---|"]
    for dtype in DTYPES:
        for torch_says in ("ok", "fail", "error", "timeout"):
            chosen = [u for (op, d, i), u in units.items() if d == dtype and len(u) == 3 and u["torch-slow"]["verdict"] == torch_says]
            if not chosen:
                continue
            counts = Counter(u["dropin"]["verdict"] for u in chosen)
            fast = sum(u["torch-fast"]["verdict"] == "ok" for u in chosen)
            lines.append(
                f"| {dtype} | {torch_says} | {len(chosen)} | {counts['ok']} | {counts['fail']} | {counts['error']} | "
                f"{counts['crash']} | {counts['timeout']} | {fast} |"
            )
    if mutants:
        lines += ["", "| slip (ops torch's slow gradcheck passes) | dtype | mutants | caught (fail) | passed | error | crash | timeout |", "|---|---|---|---|---|---|---|---|"]
        for dtype in MUTATED:
            for slip in COMPLEX_SLIPS:
                chosen = [m for m in mutants if m["slip"] == slip and m["dtype"] == dtype]
                if not chosen:
                    continue
                counts = Counter(m["verdict"] for m in chosen)
                lines.append(
                    f"| {slip} | {dtype} | {len(chosen)} | {counts['fail']} | {counts['ok']} | {counts['error']} | "
                    f"{counts['crash']} | {counts['timeout']} |"
                )
    return "\n".join(lines)


def speed(rows: dict[str, dict[str, Any]]) -> str:
    """Time per unit (issue 22's targets): the median over units where all three checkers ran,
    per checker and of the drop-in's ratio to torch's slow and fast modes, per dtype and in
    all; and every unit where torch's slow mode takes over a second and the drop-in over twice
    that."""
    units, _, _ = split(rows)
    timed = {key: u for key, u in units.items() if len(u) == 3 and all("seconds" in u[c] for c in CHECKERS)}
    lines = [
        "| dtype | units | drop-in | torch slow | torch fast | drop-in / torch slow | drop-in / torch fast |",
        "|---|---|---|---|---|---|---|",
    ]

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    for dtype in (*DTYPES, "all"):
        chosen = [u for (op, d, i), u in timed.items() if dtype in (d, "all")]
        if not chosen:
            continue
        seconds = {c: [u[c]["seconds"] for u in chosen] for c in CHECKERS}
        slow = median([u["dropin"]["seconds"] / max(u["torch-slow"]["seconds"], 1e-6) for u in chosen])
        fast = median([u["dropin"]["seconds"] / max(u["torch-fast"]["seconds"], 1e-6) for u in chosen])
        lines.append(
            f"| {dtype} | {len(chosen)} | {median(seconds['dropin']):.4f} s | {median(seconds['torch-slow']):.4f} s | "
            f"{median(seconds['torch-fast']):.4f} s | {slow:.2f}× | {fast:.2f}× |"
        )
    slow_units = [
        f"{op} {d} sample {i}: drop-in {u['dropin']['seconds']:.2f} s, torch slow {u['torch-slow']['seconds']:.2f} s"
        for (op, d, i), u in sorted(timed.items())
        if u["torch-slow"]["seconds"] > 1.0 and u["dropin"]["seconds"] > 2 * u["torch-slow"]["seconds"]
    ]
    return "\n".join(lines + ["", "units over 2× torch slow where it takes over 1 s: " + (", ".join(slow_units) or "none")])


def disagreements(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Units where torch slow passes and the drop-in does not, and mutants that pass."""
    units, mutants, wrong = split(rows)
    out = [f"mutant passes: {m['op']} {m['dtype']} {m['slip']} sample {m['index']}" for m in mutants if m["verdict"] == "ok"]
    out += [
        f"not a mutant (the op's own {m['dtype']} gradient fails torch's slow gradcheck): {m['op']} {m['slip']} "
        f"sample {m['index']}: {m['verdict']}"
        for m in wrong
    ]
    for (op, dtype, index), u in sorted(units.items()):
        if len(u) == 3 and u["torch-slow"]["verdict"] == "ok" and u["dropin"]["verdict"] != "ok":
            out.append(f"{op} {dtype} sample {index}: {u['dropin']['verdict']}: {u['dropin']['why'][:240]}")
        if len(u) == 3 and dtype != "float32" and u["torch-slow"]["verdict"] == "fail" and u["dropin"]["verdict"] == "ok":
            out.append(f"torch slow fails, the drop-in passes: {op} {dtype} sample {index}: {u['torch-slow']['why'][:240]}")
    return out


def run(names: Sequence[str] | None, limit: int | None, count: int, dtypes: Sequence[str], timeout: float,
        out: str, budget: float | None, mutants: bool, kind: str = "gradcheck", offset: float = 0.0) -> str:
    ops = op_db()
    if names:
        wanted = set(names)
        ops = [op for op in ops if op.name in wanted or op_name(op) in wanted]
    ops = ops[:limit] if limit else ops
    by_name = {op_name(op): op for op in ops}
    done = load(out)
    worker = Worker(by_name)
    started = time.perf_counter()
    ran = 0
    try:
        with open(out, "a", encoding="utf-8") as f:
            for task in tasks(ops, dtypes, count, mutants, kind, offset):
                if key(task) in done:
                    continue
                if budget is not None and time.perf_counter() - started > budget:
                    print(f"budget of {budget:g}s spent after {ran} checks; rerun to resume", flush=True)
                    break
                result = worker.run(task, timeout)
                if result["verdict"] == "no-sample":
                    continue
                name, dtype, index, checker, slip, kind, offset = task
                row = {"key": key(task), "op": name, "dtype": dtype, "index": index, "checker": checker, "slip": slip, "kind": kind,
                       "offset": offset, **result}
                done[row["key"]] = row
                f.write(json.dumps(row) + "\n")
                f.flush()
                ran += 1
    finally:
        worker.close()
    return f"{ran} checks run in {time.perf_counter() - started:.0f}s\n\n{table(done)}\n\n{speed(done)}\n\n" + "\n".join(disagreements(done))


def section(quick: bool) -> tuple[str, list[tuple[str, bool]]]:
    """benchmarks/run.py's section: a slice of op_db, gradcheck in every dtype, gradgradcheck and
    forward mode in float64, with mutants (the full run is `benchmarks/opinfo.py`). Its target counts the
    units where torch slow passes and the drop-in does not, and the mutants that pass; the units
    where torch slow fails and the drop-in passes are listed for a reader to judge."""
    targets = []
    texts = []
    for kind, dtypes, limit in (
        ("gradcheck", list(DTYPES), 10 if quick else 60),
        ("gradgradcheck", ["float64"], 5 if quick else 30),
        ("forward", ["float64"], 5 if quick else 30),
    ):
        path = os.path.join(tempfile.gettempdir(), f"backprop_check_opinfo_{kind}.jsonl")  # resumed by the next run
        texts.append(f"{kind}:\n\n" + run(None, limit, 2, dtypes, 60.0, path, 300.0 if quick else 1800.0, True, kind))
        bad = [line for line in disagreements(load(path)) if not line.startswith("torch slow fails")]
        targets.append((f"{kind}: no false alarm, error or crash where torch slow passes; no mutant passes", not bad))
    return "\n\n".join(texts), targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated op names (default: every op)")
    parser.add_argument("--limit", type=int, default=None, help="the first N ops only")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per check")
    parser.add_argument("--budget", type=float, default=None, help="stop after this many seconds (resume later)")
    parser.add_argument("--out", default="opinfo.jsonl")
    parser.add_argument("--mutants", action="store_true")
    parser.add_argument("--kind", choices=KINDS, default="gradcheck",
                        help="gradgradcheck, or gradcheck in forward mode, the drop-in's and torch's, on the ops that support it (give it an --out of its own)")
    parser.add_argument("--offset", type=float, default=0.0, help="move every differentiated input by this much (give it an --out of its own)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every differentiated input by this much (give it an --out of its own)")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    global SCALE
    SCALE = args.scale  # set before the workers fork: they read it in run_check
    if args.table:
        rows = load(args.out)
        print(table(rows) + "\n\n" + speed(rows) + "\n\n" + "\n".join(disagreements(rows)))
        return 0
    names = [n for n in args.ops.split(",") if n]
    print(run(names, args.limit, args.samples, args.dtypes.split(","), args.timeout, args.out, args.budget, args.mutants, args.kind, args.offset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
