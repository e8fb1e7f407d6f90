"""Benchmark 10: where kernel authors live (issue 22). Small custom `autograd.Function`s and a
Function that vmap cannot batch, checked by the harness and by torch's gradcheck on the same
inputs, on a quiet and on a busy machine.

The Functions (each with a hand-written backward, none with a vmap rule):

- `attention`: a tiled (flash-style) attention whose forward loops over query and key tiles in
  Python with an online softmax, and whose backward recomputes the tiles from the saved
  log-sum-exp; batch 1, 1 head, 32 tokens, head size 8, tiles of 16 (a kernel test's size: torch's
  slow gradcheck builds its whole 256×768 Jacobian, ~3 s here; at 2 heads and head size 16, ~25 s);
- `soft_dice`: a soft-Dice loss on a 2×3×8×8 probability map;
- `vocab_ce`: a vocab-parallel cross-entropy as Megatron writes it, its vocabulary of 64 split
  into 4 partitions in one process (the all-reduces are sums and maxima over the partitions), on
  8 tokens, one loss per token.

Rows, per Function (one process, interleaved repeats, medians, ratios of medians):

- `check()`: the default check (float64 and float32, the given point and 3 random points, the
  contract), with the thread policy (threads.py) and with `BACKPROP_CHECK_THREADS=keep`
  (torch's own pool), against torch's slow gradcheck in float64 plus float32 on the same inputs;
- the drop-in `backprop_check.gradcheck` against torch's slow and fast gradcheck (float64);
- torch's gradcheck always on one thread (its best case on a loaded machine, see one_thread);
- JAX's `check_grads` (reverse mode, order 1, float64) on the same function written in
  jax.numpy, at the same inputs (`jax_version`): the anchor that is not PyTorch. Like torch's
  fast mode it checks random projections and names no element. Left out without jax (the
  `bench` extra).

`--busy`: the same contenders with and without two spinning processes (one per core, bounded,
started and killed here) in alternate rounds, and each one's slow-down busy/quiet.

    .venv/bin/python benchmarks/kernels.py [--repeats N] [--busy] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

import backprop_check
from measure import Timing, seconds, table, verdict

TILE = 16
TARGET_CHECK = 1.5  # the default check() within 1.5× torch's gradcheck in float64 + float32
TARGET_DROPIN = 1.0  # the drop-in within 1× torch's slow gradcheck
SPIN_SECONDS = 300  # a spinner's bound, should this process die before it kills them


class TiledAttention(torch.autograd.Function):
    """softmax(q·kᵀ/√d)·v, tile by tile with an online softmax (flash-attention's forward), and
    the backward from the saved log-sum-exp, recomputing each tile's probabilities."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = 1 / math.sqrt(q.shape[-1])
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
        for i in range(0, q.shape[-2], TILE):
            qi = q[..., i : i + TILE, :]
            m = qi.new_full(qi.shape[:-1], -math.inf)
            total = qi.new_zeros(qi.shape[:-1])
            acc = torch.zeros_like(qi)
            for j in range(0, k.shape[-2], TILE):
                s = qi @ k[..., j : j + TILE, :].transpose(-1, -2) * scale
                m_new = torch.maximum(m, s.amax(-1))
                p = torch.exp(s - m_new[..., None])
                shrink = torch.exp(m - m_new)
                total = total * shrink + p.sum(-1)
                acc = acc * shrink[..., None] + p @ v[..., j : j + TILE, :]
                m = m_new
            out[..., i : i + TILE, :] = acc / total[..., None]
            lse[..., i : i + TILE] = m + torch.log(total)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        scale = 1 / math.sqrt(q.shape[-1])
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (dout * out).sum(-1)
        for i in range(0, q.shape[-2], TILE):
            rows = slice(i, i + TILE)
            for j in range(0, k.shape[-2], TILE):
                cols = slice(j, j + TILE)
                p = torch.exp(q[..., rows, :] @ k[..., cols, :].transpose(-1, -2) * scale - lse[..., rows, None])
                dv[..., cols, :] += p.transpose(-1, -2) @ dout[..., rows, :]
                dp = dout[..., rows, :] @ v[..., cols, :].transpose(-1, -2)
                ds = p * (dp - delta[..., rows, None])
                dq[..., rows, :] += ds @ k[..., cols, :] * scale
                dk[..., cols, :] += ds.transpose(-1, -2) @ q[..., rows, :] * scale
        return dq, dk, dv


class SoftDice(torch.autograd.Function):
    """1 − (2·Σp·t + 1)/(Σp + Σt + 1): the soft-Dice loss of a probability map p against a mask t."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inter, denom = (p * t).sum(), p.sum() + t.sum() + 1
        ctx.save_for_backward(p, t, inter, denom)
        return 1 - (2 * inter + 1) / denom

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        p, t, inter, denom = ctx.saved_tensors
        dloss_dp = -(2 * t * denom - (2 * inter + 1)) / denom**2
        return grad * dloss_dp, None


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy, its ranks' vocabulary partitions in one process:
    each partition holds `logits[..., part]`; the max, the sum of exponentials and the target's
    logit are all-reduced (here: over the partitions)."""

    PARTS = 4

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = logits.chunk(VocabParallelCrossEntropy.PARTS, dim=-1)
        top = torch.stack([part.amax(-1) for part in parts]).amax(0)  # all-reduce max
        exps, predicted, start = [], torch.zeros_like(top), 0
        for part in parts:
            shifted = part - top[..., None]
            local = target - start
            inside = (local >= 0) & (local < part.shape[-1])
            picked = shifted.gather(-1, local.clamp(0, part.shape[-1] - 1)[..., None])[..., 0]
            predicted = predicted + torch.where(inside, picked, torch.zeros_like(picked))  # all-reduce sum
            exps.append(shifted.exp())
            start += part.shape[-1]
        sum_exp = sum(e.sum(-1) for e in exps)  # all-reduce sum
        softmax = torch.cat([e / sum_exp[..., None] for e in exps], dim=-1)
        ctx.save_for_backward(softmax, target)
        return torch.log(sum_exp) - predicted

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        softmax, target = ctx.saved_tensors
        dlogits = softmax.clone()
        dlogits.scatter_add_(-1, target[..., None], -torch.ones_like(dlogits[..., :1]))
        return dlogits * grad[..., None], None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return TiledAttention.apply(q, k, v)


def soft_dice(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return SoftDice.apply(p, t)


def vocab_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return VocabParallelCrossEntropy.apply(logits, target)


def functions() -> dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]]:
    """name → (fn, float64 inputs; those that require grad are the ones checked)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    probabilities = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64).requires_grad_()
    mask = (torch.rand(2, 3, 8, 8, generator=gen) > 0.5).double()
    return {
        "attention": (attention, (randn(1, 1, 32, 8), randn(1, 1, 32, 8), randn(1, 1, 32, 8))),
        "soft_dice": (soft_dice, (probabilities, mask)),
        "vocab_ce": (vocab_ce, (randn(8, 64), torch.randint(0, 64, (8,), generator=gen))),
    }


def in_float32(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(
        x.detach().float().requires_grad_(x.requires_grad) if x.is_floating_point() else x for x in inputs
    )


@contextmanager
def thread_setting(value: str | None) -> Iterator[None]:
    """BACKPROP_CHECK_THREADS=value in the block (None: unset)."""
    saved = os.environ.pop("BACKPROP_CHECK_THREADS", None)
    if value is not None:
        os.environ["BACKPROP_CHECK_THREADS"] = value
    try:
        yield
    finally:
        os.environ.pop("BACKPROP_CHECK_THREADS", None)
        if saved is not None:
            os.environ["BACKPROP_CHECK_THREADS"] = saved


def jax_version(name: str, inputs: tuple[torch.Tensor, ...]) -> Callable[[], str] | None:
    """JAX's check_grads on `name`'s math in jax.numpy (float64, reverse mode, order 1) at the
    same inputs, the ones that require grad differentiated; None without jax."""
    try:
        import jax
        import jax.numpy as jnp
        from jax.test_util import check_grads
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    arrays = [jnp.asarray(x.detach().numpy()) for x in inputs]
    wrt = [i for i, x in enumerate(inputs) if x.requires_grad]

    def attention_(q, k, v):  # noqa: ANN001, ANN202 - softmax(q·kᵀ/√d)·v, as JAX users write it
        return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]), axis=-1) @ v

    def soft_dice_(p, t):  # noqa: ANN001, ANN202
        return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)

    def vocab_ce_(logits, target):  # noqa: ANN001, ANN202 - log Σ exp − the target's logit, per token
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]

    math_ = {"attention": attention_, "soft_dice": soft_dice_, "vocab_ce": vocab_ce_}[name]

    def differentiated(*args):  # noqa: ANN002, ANN202
        full = list(arrays)
        for i, a in zip(wrt, args):
            full[i] = a
        return math_(*full)

    def run() -> str:
        try:
            check_grads(differentiated, tuple(arrays[i] for i in wrt), order=1, modes=("rev",))
        except AssertionError:
            return "fail"
        return "ok"

    return run


def contenders(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], name: str = "") -> dict[str, Callable[[], str]]:
    """Each way of checking `fn` on `inputs`, returning what it said."""
    single = in_float32(inputs)

    def check(threads: str | None) -> Callable[[], str]:
        def run() -> str:
            with thread_setting(threads):
                return _verdicts(fn, inputs)

        return run

    def torch_both() -> str:
        with one_thread(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok64 = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
            ok32 = torch.autograd.gradcheck(fn, single, raise_exception=False)  # float32: eps, atol for float64
        return f"f64 {'ok' if ok64 else 'fail'}, f32 {'ok' if ok32 else 'fail'}"

    def dropin() -> str:
        return "ok" if backprop_check.gradcheck(fn, inputs, raise_exception=False) else "fail"

    def torch_slow() -> str:
        with one_thread():
            return "ok" if torch.autograd.gradcheck(fn, inputs, raise_exception=False) else "fail"

    def torch_fast() -> str:
        with one_thread():
            return "ok" if torch.autograd.gradcheck(fn, inputs, fast_mode=True, raise_exception=False) else "fail"

    found = {
        "check() (thread policy)": check(None),
        "check() (torch's pool: keep)": check("keep"),
        "torch gradcheck f64 + f32": torch_both,
        "drop-in gradcheck": dropin,
        "torch gradcheck slow": torch_slow,
        "torch gradcheck fast": torch_fast,
    }
    jax_check = jax_version(name, inputs) if name else None
    if jax_check is not None:
        found["JAX check_grads (rev)"] = jax_check
    return found


@contextmanager
def one_thread() -> Iterator[None]:
    """torch's gradcheck at its best here: on one thread (the issue's anchor), as a user who set
    OMP_NUM_THREADS=1 runs it; with torch's pool of 2 on this loaded machine it took 10× longer."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _verdicts(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> str:
    report = backprop_check.check(fn, inputs)
    return ", ".join(f"{r.dtype} {r.verdict}" for r in report.results)


@contextmanager
def spinning(count: int) -> Iterator[None]:
    """`count` processes, each keeping a core busy (bounded by SPIN_SECONDS), killed after."""
    loop = f"import time\nend = time.time() + {SPIN_SECONDS}\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them reach their loop
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def measure(repeats: int, busy: bool, only: Sequence[str] | None = None) -> dict[str, dict[str, tuple[Timing, Timing | None]]]:
    """name → contender → (quiet timing, busy timing or None), in alternating rounds."""
    found: dict[str, dict[str, tuple[Timing, Timing | None]]] = {}
    for name, (fn, inputs) in functions().items():
        if only and name not in only:
            continue
        ways = contenders(fn, inputs, name)
        for way in ways.values():  # warm-up: first calls, lazy imports
            way()
        quiet = {way: Timing(way) for way in ways}
        loaded = {way: Timing(way) for way in ways} if busy else {}
        for _ in range(repeats):
            for timings, load in ((quiet, False), (loaded, True)):
                if load and not busy:
                    continue
                with spinning(_cores() if load else 0):
                    for way, call in ways.items():
                        started = time.perf_counter()
                        timings[way].last = call()
                        timings[way].seconds.append(time.perf_counter() - started)
        found[name] = {way: (quiet[way], loaded.get(way)) for way in ways}
    return found


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(repeats: int = 5, busy: bool = False, only: Sequence[str] | None = None) -> tuple[str, list[tuple[str, bool]]]:
    found = measure(repeats, busy, only)
    rows, targets = [], []
    for name, ways in found.items():
        anchor = ways["torch gradcheck f64 + f32"][0].median
        slow = ways["torch gradcheck slow"][0].median
        for way, (quiet, loaded) in ways.items():
            versus = anchor if way.startswith("check()") else slow
            row = [name, way, seconds(quiet.median), quiet.spread, f"{quiet.median / versus:.2f}×", quiet.last]
            if busy:
                row += [seconds(loaded.median), f"{loaded.median / quiet.median:.1f}×"]
            rows.append(row)
        policy = ways["check() (thread policy)"][0].median
        dropin = ways["drop-in gradcheck"][0].median
        targets.append((f"{name}: check() within {TARGET_CHECK:g}× torch f64 + f32", policy <= TARGET_CHECK * anchor))
        targets.append((f"{name}: drop-in within {TARGET_DROPIN:g}× torch slow", dropin <= TARGET_DROPIN * slow))
        if busy:
            slowdown = ways["check() (thread policy)"][1].median / policy
            theirs = ways["torch gradcheck f64 + f32"][1].median / anchor
            targets.append((f"{name}: check() slows down busy ≤ torch's ({slowdown:.1f}× vs {theirs:.1f}×)", slowdown <= theirs))
    header = ["function", "contender", "median", "range", "ratio", "said"] + (["busy median", "slow-down"] if busy else [])
    lines = [
        f"{repeats} interleaved repeats, medians; ratio: check() rows against torch gradcheck f64 + f32, the "
        f"others against torch gradcheck slow; torch threads {torch.get_num_threads()}, {_cores()} cores"
        + (f"; busy: {_cores()} spinning processes started for alternate rounds" if busy else ""),
        "",
        table(header, rows),
        "",
        table(["target", "result"], [[text, verdict(ok)] for text, ok in targets]),
    ]
    return "\n".join(lines), targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", action="store_true", help="also with every core kept busy by spinning processes")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="these Functions only (attention, soft_dice, vocab_ce)")
    args = parser.parse_args(argv)
    print(f"load {open('/proc/loadavg').read().strip()}" if os.path.exists("/proc/loadavg") else "")
    text, _ = run(args.repeats, args.busy, args.only)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
