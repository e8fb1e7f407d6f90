"""Benchmark 1: the harness against `torch.autograd.gradcheck` on the same tanh MLPs, float64,
CPU, in one process.

gradcheck's slow mode builds the whole numerical Jacobian one element at a time (two forward
passes per parameter element) and compares it with autograd's: two-way, no hand-derived
gradient. Its fast mode checks one random projection and cannot name an element. The harness
checks three ways (manual, numerical, autograd) per element in its full mode, and in its
default mode checks random directional derivatives of each tensor plus a sample of its
elements, falling back to the full check of a tensor that disagrees.

Three models: tanh MLPs with an MSE loss of ~1.1k and ~22k parameters (`models.py`), and issue
11's classifier 100→200→10 on a batch of 64 (`classifier.py`), whose 2,000-element W2 sits just
under the size at which today's engine stops checking a tensor element by element.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import backprop_check
import classifier
from measure import interleaved, seconds, table, verdict
from models import NAMES, SAMPLES, Bug, Mlp, gradcheck_target, make_case

SMALL = Mlp(16, 32, 16)  # 1,089 parameters
LARGE = Mlp(64, 128, 104)  # 21,841 parameters
# One element of the middle weight, 1 % off: the kind of slip a sampled check could miss.
PLANTED = Bug("W2", (37, 51), 1.01)
# Issue 11's model at ~22k parameters: a classifier whose W2 (200×10 = 2,000 elements) sits just
# under the 2,048-element threshold below which today's engine checks a tensor element by element.
CLASSIFIER = classifier.Classifier((100, 200, 10), batch=64)  # 22,210 parameters
CLASSIFIER_BUG = classifier.Bug("W2", (150, 7), 1.001)

TARGET_FULL_SMALL = 5.0
TARGET_DEFAULT_LARGE = 50.0
TARGET_FULL_LARGE = 10.0


@dataclass
class Outcome:
    """What one check said: its verdict and, for a mismatch, culprit and the worst element."""

    verdict: str
    culprit: str | None = None
    where: str | None = None

    def __str__(self) -> str:
        text = self.verdict if self.culprit is None else f"{self.verdict} ({self.culprit})"
        return text if self.where is None else f"{text} at {self.where}"


def harness(case: backprop_check.Case, full: bool) -> Outcome:
    """One run of the Python API on the given point, CPU, float64."""
    report = backprop_check.run([case], devices=["cpu"], dtypes=["float64"], points=0, full=full)
    (result,) = report.results
    bad = [check for check in result.checks if check.verdict == "mismatch"]
    return Outcome(result.verdict, result.culprit, bad[0].label if bad else None)


def gradcheck(mlp: Mlp | classifier.Classifier, fast: bool) -> Outcome:
    """torch.autograd.gradcheck (its defaults) on the loss as a function of the parameters."""
    fn, params = classifier.gradcheck_target(mlp) if isinstance(mlp, classifier.Classifier) else gradcheck_target(mlp)
    passed = torch.autograd.gradcheck(fn, params, fast_mode=fast, raise_exception=False)
    return Outcome("ok" if passed else "mismatch")


def jax_check(mlp: Mlp | classifier.Classifier) -> Callable[[], Outcome] | None:
    """JAX's `check_grads` (reverse mode, first order, float64) on the same loss written in
    jax.numpy, at the same parameters and data: the anchor beside gradcheck slow and fast. Like
    gradcheck fast it checks random projections and names no element. None without jax (a
    bench-only extra: `pip install -e ".[bench]"`)."""
    if isinstance(mlp, classifier.Classifier):
        import scale  # its classifier loss in jax.numpy; imported here, as scale imports this module

        check = scale.jax_check(mlp)
        return None if isinstance(check, str) else check
    try:
        import jax
        import jax.numpy as jnp
        from jax.test_util import check_grads
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    data = {name: jnp.asarray(value.numpy()) for name, value in mlp.data().items()}
    params = mlp.params()
    args = tuple(jnp.asarray(params[name].numpy()) for name in NAMES)

    def loss(W1: Any, b1: Any, W2: Any, b2: Any, W3: Any, b3: Any) -> Any:
        a1 = jnp.tanh(data["X"] @ W1 + b1)
        a2 = jnp.tanh(a1 @ W2 + b2)
        return jnp.mean((a2 @ W3 + b3 - data["Y"]) ** 2)

    def run() -> Outcome:
        try:
            check_grads(loss, args, order=1, modes=("rev",))
        except AssertionError:
            return Outcome("mismatch")
        return Outcome("ok")

    return run


def with_jax(contenders: dict[str, Callable[[], Outcome]], mlp: Mlp | classifier.Classifier) -> dict[str, Callable[[], Outcome]]:
    """The contenders, with JAX's check_grads after gradcheck fast when jax is installed."""
    check = jax_check(mlp)
    if check is None:
        return contenders
    check()  # warm-up, untimed: jit compilation
    names = list(contenders)
    at = names.index("gradcheck fast") + 1
    return {**{n: contenders[n] for n in names[:at]}, "JAX check_grads": check, **{n: contenders[n] for n in names[at:]}}


def run(repeats: int = 5, large_repeats: int = 3) -> tuple[str, list[tuple[str, bool]]]:
    """Time everything; return the printed section and (target, passed) pairs."""
    small, large, buggy = make_case(SMALL), make_case(LARGE), make_case(LARGE, PLANTED)
    wide, wide_buggy = classifier.make_case(CLASSIFIER), classifier.make_case(CLASSIFIER, CLASSIFIER_BUG)
    warnings.filterwarnings("ignore", module="torch.autograd.gradcheck")
    # Warm-up, untimed: first calls pay for lazy imports and vmap's set-up in both tools.
    for mode in (True, False):
        harness(small, full=mode)
        gradcheck(SMALL, fast=mode)

    at_small = interleaved(
        with_jax({
            "gradcheck slow": lambda: gradcheck(SMALL, fast=False),
            "gradcheck fast": lambda: gradcheck(SMALL, fast=True),
            "harness full (three-way)": lambda: harness(small, full=True),
            "harness default": lambda: harness(small, full=False),
        }, SMALL),
        repeats,
    )
    at_large = interleaved(
        with_jax({
            "gradcheck slow": lambda: gradcheck(LARGE, fast=False),
            "gradcheck fast": lambda: gradcheck(LARGE, fast=True),
            "harness full (three-way)": lambda: harness(large, full=True),
            "harness default": lambda: harness(large, full=False),
            "harness default, planted bug": lambda: harness(buggy, full=False),
        }, LARGE),
        {  # the slow contenders fewer times, to keep `make bench` within about five minutes
            "gradcheck slow": large_repeats,
            "gradcheck fast": repeats,
            "JAX check_grads": repeats,
            "harness full (three-way)": large_repeats - 1,
            "harness default": repeats,
            "harness default, planted bug": large_repeats,
        },
    )
    at_wide = interleaved(
        with_jax({
            "gradcheck slow": lambda: gradcheck(CLASSIFIER, fast=False),
            "gradcheck fast": lambda: gradcheck(CLASSIFIER, fast=True),
            "harness full (three-way)": lambda: harness(wide, full=True),
            "harness default": lambda: harness(wide, full=False),
            "harness default, planted bug": lambda: harness(wide_buggy, full=False),
        }, CLASSIFIER),
        {
            "gradcheck slow": large_repeats,
            "gradcheck fast": repeats,
            "JAX check_grads": repeats,
            "harness full (three-way)": large_repeats - 1,
            "harness default": repeats,
            "harness default, planted bug": large_repeats,
        },
    )

    rows = []
    for mlp, timings in ((SMALL, at_small), (LARGE, at_large), (CLASSIFIER, at_wide)):
        slow = timings["gradcheck slow"].median
        for name, timing in timings.items():
            rows.append(
                [
                    f"{mlp.size:,}",
                    name,
                    len(timing.seconds),
                    seconds(timing.median),
                    timing.spread + " s",
                    f"{slow / timing.median:.1f}×",
                    str(timing.last),
                ]
            )
    lines = [
        f"MLPs {SMALL.label} ({SMALL.size:,} parameters) and {LARGE.label} ({LARGE.size:,} parameters), "
        f"tanh, MSE on {SAMPLES} samples; float64, CPU, given point only; "
        f"torch threads {torch.get_num_threads()}",
        f"planted bug: {PLANTED.describe()} (relative error 1e-2 in one of {LARGE.params()['W2'].numel():,} elements)",
        f"and the classifier {CLASSIFIER.label} ({CLASSIFIER.size:,} parameters; W2 has "
        f"{CLASSIFIER.params()['W2'].numel():,} elements, just under 2,048), tanh, softmax cross-entropy on "
        f"{CLASSIFIER.batch} samples; planted bug {CLASSIFIER_BUG.describe()} (relative error 1e-3)",
    ]
    lines.append("")
    lines.append(
        table(["params", "check", "n", "median", "range", "vs gradcheck slow", "verdict"], rows)
    )

    full_speedup = at_small["gradcheck slow"].median / at_small["harness full (three-way)"].median
    default_speedup = at_large["gradcheck slow"].median / at_large["harness default"].median
    same_verdict = str(at_large["gradcheck slow"].last) == "ok" and at_large["harness default"].last.verdict == "ok"
    found: Outcome = at_large["harness default, planted bug"].last
    expected_where = f"{PLANTED.param}[{', '.join(map(str, PLANTED.index))}]"
    located = found.verdict == "mismatch" and found.culprit == "manual" and found.where == expected_where
    bug_time = at_large["harness default, planted bug"].median
    wide_default = at_wide["gradcheck slow"].median / at_wide["harness default"].median
    full_large = at_large["gradcheck slow"].median / at_large["harness full (three-way)"].median
    full_wide = at_wide["gradcheck slow"].median / at_wide["harness full (three-way)"].median
    wide_found: Outcome = at_wide["harness default, planted bug"].last
    wide_located = wide_found.verdict == "mismatch" and wide_found.culprit == "manual" and wide_found.where == CLASSIFIER_BUG.where
    targets = [
        (f"full three-way ≥ {TARGET_FULL_SMALL:g}× faster than gradcheck slow at {SMALL.size:,}: {full_speedup:.1f}×",
         full_speedup >= TARGET_FULL_SMALL),
        (f"default mode ≥ {TARGET_DEFAULT_LARGE:g}× faster than gradcheck slow at {LARGE.size:,}: {default_speedup:.1f}×",
         default_speedup >= TARGET_DEFAULT_LARGE),
        ("default mode and gradcheck slow both say ok at "
         f"{LARGE.size:,}: gradcheck {at_large['gradcheck slow'].last}, harness {at_large['harness default'].last}",
         same_verdict),
        (f"planted bug found and located in default mode: {found} (want mismatch (manual) at {expected_where}), "
         f"in {seconds(bug_time)}", located),
        (f"default mode ≥ {TARGET_DEFAULT_LARGE:g}× faster than gradcheck slow at {CLASSIFIER.size:,} "
         f"({CLASSIFIER.label}, batch {CLASSIFIER.batch}): {wide_default:.1f}×", wide_default >= TARGET_DEFAULT_LARGE),
        (f"full ≥ {TARGET_FULL_LARGE:g}× faster than gradcheck slow at {LARGE.size:,}: {full_large:.1f}×",
         full_large >= TARGET_FULL_LARGE),
        (f"full ≥ {TARGET_FULL_LARGE:g}× faster than gradcheck slow at {CLASSIFIER.size:,}: {full_wide:.1f}×",
         full_wide >= TARGET_FULL_LARGE),
        (f"planted ×1.001 in the 2,000-element W2 found and located in default mode: {wide_found} "
         f"(want mismatch (manual) at {CLASSIFIER_BUG.where}), in {seconds(at_wide['harness default, planted bug'].median)}",
         wide_located),
    ]
    lines.append("")
    lines.extend(f"  {verdict(ok)}  {text}" for text, ok in targets)
    return "\n".join(lines), targets
