"""Benchmark 4: does a wrong gradient pass? Planted single-element errors in the default mode.

The experiment of issue 11, reproducible. tanh MLP classifiers with a softmax cross-entropy loss
over integer labels (`classifier.py`), built in code with `backprop_check.case(...)`, run through
the public API in the default mode (`full=False`), CPU, at the given point only (the guarantee
is per point: a bug caught only at some random point is missed at the others).

- **Three-way:** a hand-written backward that is right except for one element of one weight
  gradient, scaled by 1.001 (float64) or 1.05 (float32), the issue's targets. Half of the
  elements are drawn among those whose true gradient is below the tensor's median magnitude,
  half from the whole tensor. Caught = verdict `mismatch`, culprit `manual`, and the planted
  element named (a check of that tensor at that index, or its label in the message).
- **The issue's variant:** the same at ×1.01 and ×1.001 in both dtypes on the 70k and 400k
  models, as the issue tried it (×1.001 in float32 is below the float32 target of 5e-2).
- **Two-way:** no manual gradient; the layer with the slip runs through a custom
  `torch.autograd.Function` whose backward carries it. Caught = `mismatch`, culprit `autograd`.
- **False alarms:** the same correct models at the given point and random points, both dtypes.

Every pick is seeded: a re-run on another engine checks the same elements. A case that runs past
the benchmark's time limit counts as an error, not as caught (today's engine then reports
`error` and drops what it found).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import backprop_check
from classifier import Bug, Classifier, gradient, make_case
from measure import seconds, table, verdict

TARGET_FACTORS = {"float64": 1.001, "float32": 1.05}
ISSUE_FACTORS = (1.01, 1.001)
DTYPES = ("float64", "float32")
TIME_LIMIT = 60.0  # seconds per case: today's engine takes minutes to locate a bug in 1M elements


@dataclass(frozen=True)
class Setting:
    """A model and the weight tensors that get the planted element (in turn)."""

    label: str
    model: Classifier
    tensors: tuple[str, ...]
    big: bool = False  # few trials: one default-mode run of it takes tens of seconds

    def elements(self) -> str:
        return "/".join(f"{_count(self.model.shape(t))}" for t in self.tensors)


def _count(shape: tuple[int, ...]) -> str:
    n = 1
    for s in shape:
        n *= s
    return f"{n / 1e6:g}M" if n >= 10**6 else f"{n / 1e3:g}k" if n >= 10**4 else f"{n:,}"


SETTINGS = (
    Setting("10k tensor", Classifier((100, 100, 50, 10)), ("W1",)),
    Setting("70k params", Classifier((256, 200, 100, 10)), ("W1", "W2", "W3")),
    Setting("100k tensor", Classifier((500, 200, 10)), ("W1",)),
    Setting("400k params", Classifier((784, 400, 200, 10)), ("W1", "W2", "W3")),
    Setting("1M tensor", Classifier((1000, 1000, 10)), ("W1",), big=True),
)
ISSUE_SETTINGS = (SETTINGS[1], SETTINGS[3])


@dataclass(frozen=True)
class Plan:
    """How many runs of each kind; `quick` is the short version."""

    trials: int  # planted elements per setting and dtype
    big_trials: int  # the same for a `big` setting
    issue_trials: int  # per setting, dtype and factor of the issue's variant
    two_way_trials: int  # per setting and dtype (a big setting: 1)
    alarm_points: int  # random points (besides the given one) for the false-alarm runs
    time_limit: float = TIME_LIMIT


FULL = Plan(trials=4, big_trials=2, issue_trials=3, two_way_trials=2, alarm_points=3)
QUICK = Plan(trials=2, big_trials=1, issue_trials=1, two_way_trials=1, alarm_points=1)


@dataclass
class Trial:
    """One planted bug (or none) run once, and what the harness said."""

    setting: Setting
    dtype: str
    bug: Bug | None
    two_way: bool = False
    small: bool = False  # drawn among the elements below the median magnitude
    relative: float = 0.0  # |true gradient| of the element / the tensor's median |gradient|
    points: int = 0  # random points besides the given one
    verdict: str = ""
    culprit: str | None = None
    named: bool = False
    seconds: float = 0.0
    message: str = ""
    results: list[backprop_check.Result] = field(default_factory=list)

    @property
    def want(self) -> str:
        return "autograd" if self.two_way else "manual"

    @property
    def caught(self) -> bool:
        return self.verdict == "mismatch" and self.culprit == self.want and self.named

    @property
    def outcome(self) -> str:
        """caught | missed (ok) | flagged, not located | error: …"""
        if self.caught:
            return "caught"
        if self.verdict == "ok":
            return "missed (ok)"
        if self.verdict == "mismatch":
            return f"flagged, culprit {self.culprit}, element {'named' if self.named else 'not named'}"
        return f"{self.verdict}: {self.message.rsplit(': ', 1)[-1][:70]}"  # the reason, not the file


def choose(setting: Setting, count: int, seed: int) -> list[tuple[str, tuple[int, ...], bool, float]]:
    """`count` elements (tensor, index, small?, |g| / median |g|): even ones below the median."""
    grads = gradient(setting.model)
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for i in range(count):
        name = setting.tensors[i % len(setting.tensors)]
        magnitude = grads[name].abs().flatten()
        median = magnitude.median()
        small = i % 2 == 0
        pool = (magnitude < median).nonzero().flatten() if small else torch.arange(magnitude.numel())
        flat = int(pool[torch.randint(pool.numel(), (1,), generator=gen)])
        index = tuple(int(k) for k in _unravel(flat, grads[name].shape))
        picks.append((name, index, small, float(magnitude[flat] / median)))
    return picks


def _unravel(flat: int, shape: Sequence[int]) -> list[int]:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return index[::-1]


def execute(trial: Trial, points: int, time_limit: float) -> Trial:
    """Run the trial's case once through the public API; record verdict, culprit, element."""
    case = make_case(trial.setting.model, trial.bug, two_way=trial.two_way)
    started = time.perf_counter()
    report = backprop_check.run(
        [case], devices=["cpu"], dtypes=[trial.dtype], points=points, full=False, timeout=time_limit
    )
    trial.seconds = time.perf_counter() - started
    (result,) = report.results
    trial.results = [result]
    trial.verdict, trial.culprit, trial.message = result.verdict, result.culprit, result.message
    if trial.bug is not None:
        bug = trial.bug
        in_checks = any(
            check.name == bug.param and check.index is not None and tuple(check.index) == bug.index
            and check.verdict == "mismatch"
            for check in result.checks
        )
        trial.named = in_checks or bug.where in result.message
    return trial


def planted(
    settings: Sequence[Setting], factors: dict[str, float], count: int, big_count: int, seed: int,
    two_way: bool, time_limit: float,
) -> list[Trial]:
    trials = []
    for number, setting in enumerate(settings):
        n = big_count if setting.big else count
        for dtype in factors:
            for name, index, small, relative in choose(setting, n, seed * 1000 + number * 10 + DTYPES.index(dtype)):
                trial = Trial(setting, dtype, Bug(name, index, factors[dtype]), two_way, small, relative)
                print(f"    {setting.label} {dtype} {'two-way' if two_way else 'three-way'} "
                      f"{trial.bug.describe()}: ", end="", flush=True)  # type: ignore[union-attr]
                execute(trial, points=0, time_limit=time_limit)
                print(f"{trial.outcome} ({seconds(trial.seconds)})", flush=True)
                trials.append(trial)
    return trials


def tally(trials: Sequence[Trial], keys: Sequence[str]) -> str:
    """One row per group of trials with the same setting, dtype and factor."""
    groups: dict[tuple[str, str, str], list[Trial]] = {}
    for t in trials:
        assert t.bug is not None
        groups.setdefault((t.setting.label, t.dtype, f"×{t.bug.factor:g}"), []).append(t)
    rows = []
    for (label, dtype, factor), group in groups.items():
        setting = group[0].setting
        small = [t for t in group if t.small]
        rows.append([
            label, f"{setting.model.size:,}", setting.elements(), dtype, factor, len(group),
            sum(t.caught for t in group), sum(t.verdict == "ok" for t in group),
            sum(not t.caught and t.verdict != "ok" for t in group),
            f"{sum(t.caught for t in small)}/{len(small)}",
            seconds(statistics.median(t.seconds for t in group)),
        ])
    return table(list(keys), rows)


HEADER = ("setting", "params", "tensor(s)", "dtype", "factor", "n", "caught", "missed (ok)", "other",
          "caught < median", "median time")


def false_alarms(settings: Sequence[Setting], points: int, time_limit: float) -> list[Trial]:
    """The correct models; a big one at one random point, with three times the time limit."""
    trials = []
    for setting in settings:
        n, limit = (min(points, 1), 3 * time_limit) if setting.big else (points, time_limit)
        for dtype in DTYPES:
            trial = Trial(setting, dtype, None, points=n)
            print(f"    {setting.label} {dtype} correct, given + {n} random points: ", end="", flush=True)
            execute(trial, points=n, time_limit=limit)
            print(f"{trial.verdict} ({seconds(trial.seconds)})", flush=True)
            trials.append(trial)
    return trials


def misses(trials: Sequence[Trial]) -> list[str]:
    return [
        f"  {t.setting.label} {t.dtype} {'two-way' if t.two_way else 'three-way'} {t.bug.describe()} "  # type: ignore[union-attr]
        f"(|g| = {t.relative:.2g}× median): {t.outcome}"
        for t in trials if not t.caught
    ]


def run(quick: bool = False, seed: int = 0) -> tuple[str, list[tuple[str, bool]]]:
    """Every kind of trial; return the printed section and (target, passed) pairs."""
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    print("  three-way, planted ×1.001 (float64) / ×1.05 (float32):", flush=True)
    three = planted(SETTINGS, TARGET_FACTORS, plan.trials, plan.big_trials, seed, False, plan.time_limit)
    print("  the issue's variant, ×1.01 and ×1.001:", flush=True)
    issue = [
        trial
        for factor in ISSUE_FACTORS
        for trial in planted(ISSUE_SETTINGS, {d: factor for d in DTYPES}, plan.issue_trials, plan.issue_trials,
                             seed + 1 + ISSUE_FACTORS.index(factor), False, plan.time_limit)
    ]
    print("  two-way, the slip in a custom autograd.Function's backward:", flush=True)
    two = planted(SETTINGS, TARGET_FACTORS, plan.two_way_trials, 1, seed + 7, True, plan.time_limit)
    print("  false alarms on the correct models:", flush=True)
    alarms = false_alarms(SETTINGS, plan.alarm_points, plan.time_limit)

    alarm_rows = [
        [t.setting.label, f"{t.setting.model.size:,}", t.dtype, f"given + {t.points}", t.verdict,
         t.culprit or "", seconds(t.seconds)]
        for t in alarms
    ]
    wrong = [t for t in alarms if t.verdict != "ok"]
    alarmed = [t for t in wrong if t.verdict in ("mismatch", "nondifferentiable")]  # the rest: errors
    lines = [
        f"tanh MLP classifiers, softmax cross-entropy over integer labels, batch {SETTINGS[0].model.batch}; "
        f"default mode (full=False), CPU, given point only for planted bugs; time limit {plan.time_limit:g} s "
        f"per case; {'quick' if quick else 'full'} plan; torch threads {torch.get_num_threads()}",
        "",
        "Three-way (manual slipped), the issue's targets:",
        tally(three, HEADER),
        "",
        "The issue's variant (its 22 gradients: 70k and 400k, ×1.01 and ×1.001, both dtypes):",
        tally(issue, HEADER),
        "",
        "Two-way (no manual; custom autograd.Function backward slipped; caught = mismatch, culprit autograd):",
        tally(two, HEADER),
        "",
        "False alarms on the correct models:",
        table(["setting", "params", "dtype", "points", "verdict", "culprit", "time"], alarm_rows),
    ]
    not_caught = misses(three + issue + two)
    if not_caught:
        lines += ["", f"Not caught ({len(not_caught)}):", *not_caught]
    lines += [""] + [f"  false alarm: {t.setting.label} {t.dtype}: {t.verdict}: {t.message[:120]}" for t in wrong]
    targets = [
        (f"every planted ×1.001 (float64) / ×1.05 (float32) manual slip caught, culprit manual, element named: "
         f"{sum(t.caught for t in three)}/{len(three)}", all(t.caught for t in three)),
        (f"every planted autograd slip caught (two-way), culprit autograd: {sum(t.caught for t in two)}/{len(two)}",
         all(t.caught for t in two)),
        (f"every correct model ok: {len(alarms) - len(wrong)}/{len(alarms)} ok, {len(alarmed)} false alarm(s) "
         f"(mismatch), {len(wrong) - len(alarmed)} without a verdict (error, e.g. the time limit)", not wrong),
    ]
    lines.append(f"({seconds(time.perf_counter() - started)} in all)")
    lines.extend(f"  {verdict(ok)}  {text}" for text, ok in targets)
    lines.append(f"  (info) the issue's variant: {sum(t.caught for t in issue)}/{len(issue)} caught, "
                 f"{sum(t.verdict == 'ok' for t in issue)} reported ok")
    return "\n".join(lines), targets


if __name__ == "__main__":
    import sys

    text, _ = run(quick="--quick" in sys.argv[1:])
    print(text)
