"""`backprop-check trace PATH --epochs N --lr F`: replay gradient descent, checking every step.

From the case's given point, each step computes the three gradients at the current parameters,
compares them, and — when they agree — updates every parameter the way the seeds' loops do,

    p ← p − lr · dloss/dp        (autograd's gradient, in the run's dtype: float32 by default)

It stops at the first step where the gradients disagree, names it and exits 1. `--per-sample`
feeds one sample per step, as seed 003's loop does: sample i of every datum, keeping the leading
dimension (a batch of one, so a forward and a manual gradient written for batches work as they
are); without it every step sees all the data. The output copies the seed's prints, under a line
that names the columns and over one that closes the replay:

    predict (before training) 4 4.0          (with --predict X: node 'y_hat' when the
    columns: grad: x y dloss/dw; ...          first datum is X)
        grad: 1.0 2.0 -2.0
    progress: 0 7.315943717956543            (the epoch's last step's loss)
    predict (after training) 4 7.999998569488525
    checked 300 steps (100 epochs × 3 samples): manual, numerical and autograd agree at every step

`--plot FILE.png` draws the loss per step and the three gradients' agreement per step.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from backprop_check import dtypes
from backprop_check.model.case import Case
from backprop_check.records import MISMATCH
from backprop_check.errors import CaseError, CaseTimeout, UsageError
from backprop_check.model.loader import pick
from backprop_check.formats import check_writable, write
from backprop_check.formats.json import finite
from backprop_check.model.forward import call_forward
from backprop_check.model.points import Point, given_point
from backprop_check.records import Result
from backprop_check.engine.guards import NonFiniteLoss
from backprop_check.engine.runner import check_point, device_unavailable
from backprop_check.engine.verdict import outcome_of, summarize
from backprop_check.sources import Gradients
from backprop_check.sources.numerical import reference
from backprop_check.formats.terminal import style_for
from backprop_check.engine.tolerance import tolerance_for

PREDICT_NODE = "y_hat"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="case file or folder")
    parser.add_argument("-k", dest="select", metavar="NAME", help="the case to replay (an exact name wins)")
    parser.add_argument("--epochs", type=int, required=True, metavar="N", help="passes over the data")
    parser.add_argument("--lr", type=float, required=True, metavar="F", help="learning rate")
    parser.add_argument("--per-sample", action="store_true", help="one sample per step (stochastic gradient descent)")
    parser.add_argument("--dtype", default="float32", metavar="D", help="dtype of the run (default: float32)")
    parser.add_argument("--device", default="cpu", metavar="DEV", help="device of the autograd and manual gradients (default: cpu)")
    parser.add_argument("--every", type=int, default=1, metavar="K", help="print every K-th epoch only (and the last)")
    parser.add_argument("--predict", metavar="X", help="print node 'y_hat' for the first datum = X, before and after")
    parser.add_argument("--json", metavar="FILE", help="write the whole trace as JSON to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the loss and the gradients' agreement per step (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random initial values (default: 0)")


def command(args: argparse.Namespace) -> int:
    """replay gradient descent from the given point, checking all three gradients at every step"""
    settings = Settings.from_args(args)
    if args.json:
        check_writable(args.json, "--json")  # before the replay, not after it
    cases, code = pick(args.paths, args.select)
    if len(cases) > 1:
        names = ", ".join(case.name for case in cases)
        raise UsageError(f"trace replays one case; {len(cases)} match ({names}): choose one with -k NAME")
    if not cases:
        return code
    if args.plot:
        from backprop_check.formats import plot

        plot.require()  # before the replay: a missing matplotlib is a one-line usage error
    trace = Trace(cases[0], settings)
    trace.run()
    if args.json:
        write(args.json, json.dumps(finite(trace.to_dict()), indent=2, ensure_ascii=False) + "\n")
    if args.plot:
        plot.save(plot.trace_figure(trace.to_dict()), args.plot)
    return max(code, trace.exit_code)


@dataclass(frozen=True)
class Settings:
    """The options of one replay, checked once."""

    epochs: int
    lr: float
    per_sample: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    every: int = 1
    predict: str | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        settings = cls(args.epochs, args.lr, args.per_sample, args.dtype, args.device, args.every, args.predict, args.seed)
        settings.validate()
        return settings

    def validate(self) -> None:
        dtypes.require(self.dtype)
        if self.epochs < 0 or self.every < 1:
            raise UsageError("--epochs must be 0 or more and --every at least 1")
        if not math.isfinite(self.lr):
            raise UsageError(f"--lr must be a finite number, got {self.lr}")
        unavailable = device_unavailable(self.device)
        if unavailable:
            raise UsageError(f"--device {self.device}: {unavailable}")
        if self.predict is not None:
            try:
                float(self.predict)
            except ValueError:
                raise UsageError(f"--predict takes a number, got {self.predict!r}") from None


@dataclass
class Trace:
    """One replay: the steps taken, the epochs' losses, and where (if anywhere) it stopped."""

    case: Case
    settings: Settings
    steps: list[dict[str, Any]] = field(default_factory=list)
    progress: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, Any] = field(default_factory=dict)
    stopped: Result | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        return 2 if self.error else (1 if self.stopped else 0)

    def run(self, out: Any = None) -> None:
        """Replay, printing to `out` (stdout by default); errors end it with one line."""
        out = out or sys.stdout
        try:
            self._replay(out)
        except CaseTimeout:
            raise
        except CaseError as exc:
            self.error = f"{self.case.where}: {self.case.name}: {exc}"
            print(f"error: {self.error}", file=sys.stderr)

    def _replay(self, out: Any) -> None:
        s = self.settings
        dtype = getattr(torch, s.dtype)
        given = given_point(self.case, s.seed)
        params = {k: v.to(dtype) for k, v in given.params.items()}
        samples = batch_size(given.data) if s.per_sample else None
        if s.predict is not None:
            self.predictions = {"x": s.predict, "before": self.predict(given, params)}
            print("predict (before training)", s.predict, self.predictions["before"], file=out)
        step = 0
        labelled = False
        for epoch in range(s.epochs):
            shown = epoch % s.every == 0 or epoch == s.epochs - 1
            for index in range(samples) if samples is not None else [None]:
                step += 1
                data = given.data if index is None else {k: at(v, index) for k, v in given.data.items()}
                grads, loss = self.check(step, epoch, index, replace(given, params=params, data=data))
                if self.stopped is not None:
                    self._print_stop(out)
                    return
                if shown and not labelled:
                    print(self.columns(data if index is not None else {}, grads), file=out)
                    labelled = True
                if shown:
                    inputs = [printed(k, v) for k, v in data.items()] if index is not None else []
                    print("\tgrad:", *inputs, *(printed(k, g) for k, g in grads.items()), file=out)
                # The seed's update, `w.data = w.data - 0.01 * w.grad.data`, in the run's dtype.
                params = {k: v - s.lr * grads[k].to(v.device, v.dtype) for k, v in params.items()}
            self.progress.append({"epoch": epoch, "loss": loss})
            if shown:
                print("progress:", epoch, loss, file=out)
        if s.predict is not None:
            self.predictions["after"] = self.predict(given, params)
            print("predict (after training)", s.predict, self.predictions["after"], file=out)
        print(self.closing(step, samples), file=out)

    def columns(self, data: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> str:
        """The line that names what the `grad:` and `progress:` lines print."""
        names = [*data, *(f"dloss/d{k}" for k in grads)]
        return f"columns: grad: {' '.join(names)}; progress: epoch loss"

    def closing(self, steps: int, samples: int | None) -> str:
        """The last line of a replay that ran through."""
        if self.case.numpy:  # autograd does not apply to numpy code: two sources were compared
            sources = "manual and numerical"
        else:
            sources = "manual, numerical and autograd" if self.case.manual_fn else "numerical and autograd"
        per = f" ({self.settings.epochs} epochs × {samples} samples)" if samples is not None else ""
        return f"checked {steps} step{'s' if steps != 1 else ''}{per}: {sources} agree at every step"

    def check(self, step: int, epoch: int, index: int | None, here: Point) -> tuple[dict[str, torch.Tensor], float]:
        """The three gradients at this step's parameters and data (`here`, in the run's dtype);
        sets `stopped` when they disagree."""
        s, dtype = self.settings, getattr(torch, self.settings.dtype)
        where = f"epoch {epoch}" + (f", sample {index}" if index is not None else "")
        point = replace(here, label=f"point of step {step} ({where})", params={k: v.to(torch.float64) for k, v in here.params.items()})
        tol = tolerance_for(dtype, self.case.rtol, self.case.atol)
        try:
            numerical = reference(self.case, point, dtype, full=True)
            if not math.isfinite(float(numerical.gradients.loss)):
                raise NonFiniteLoss("the float64 loss is not finite", float(numerical.gradients.loss))
            checked = check_point(self.case, point, s.device, dtype, numerical, tol)
        except CaseTimeout:
            raise
        except NonFiniteLoss as exc:
            message = f"the loss is {exc.value} at step {step} ({where}): gradient descent diverged (a smaller --lr?)"
            raise CaseError(message) from exc
        except CaseError as exc:
            raise CaseError(f"{exc} (at step {step}, {where})") from exc
        autograd, manual = checked.gradients["autograd"], checked.gradients["manual"]
        numerical = checked.gradients["numerical"]
        # A numpy case has no autograd: its loop steps with the manual gradient, as the tutorial's does.
        stepper = autograd if autograd is not None else manual
        loss = float(autograd.loss if autograd is not None else numerical.loss)
        outcome = outcome_of(point, checked.checks, checked.gradients, self.case)
        self.steps.append(_step_record(step, epoch, index, loss, here.params, numerical, autograd, manual, outcome.verdict))
        self.steps[-1]["tolerance_ratio"] = max((c.ratio for c in checked.checks), default=0.0)
        if outcome.verdict == MISMATCH:
            self.stopped = summarize(self.case, s.device, s.dtype, [outcome], tol)
            self.steps[-1]["checks"] = [check.to_dict() for check in checked.checks]
        return {k: stepper.values[k] for k in point.params}, loss

    def predict(self, given: Point, params: dict[str, torch.Tensor]) -> Any:
        """Node 'y_hat' at `params` with the first datum set to --predict (the other data: the
        given point's first sample)."""
        data = given.data
        if not data:
            raise UsageError("--predict needs a datum to set; the case has no data")
        try:
            sample = {k: at(v, 0) for k, v in data.items()} if batch_size(data) else dict(data)
        except UsageError:  # no single sample dimension: predict with the data as they are
            sample = dict(data)
        first = next(iter(sample))
        dtype = getattr(torch, self.settings.dtype)
        sample[first] = torch.full_like(sample[first], float(self.settings.predict), dtype=torch.float64)
        sample = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sample.items()}
        with torch.no_grad():
            _, tape = call_forward(self.case, replace(given, params=params, data=sample))
        if PREDICT_NODE not in tape.values:
            raise UsageError(f"--predict reads node {PREDICT_NODE!r}; {self.case.name} marks no such node (node('y_hat', …))")
        return value_of(tape.values[PREDICT_NODE])

    def _print_stop(self, out: Any) -> None:
        result = self.stopped
        assert result is not None
        step = self.steps[-1]
        width = style_for(out).width
        lines = textwrap.wrap(f"✗ {result.message}", width, subsequent_indent="    ", break_on_hyphens=False)
        for hint in result.hints:
            lines += textwrap.wrap(f"hint: {hint}", width, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False)
        lines.append(f"stopped at step {step['step']} (epoch {step['epoch']}): the {result.culprit or 'three'} gradient"
                     f"{'' if result.culprit else 's'} {'is the odd one out' if result.culprit else 'disagree'}")
        print("\n".join(lines), file=out)

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        stopped = None
        if self.stopped is not None:
            stopped = {"step": self.steps[-1]["step"]} | {
                k: self.stopped.to_dict()[k] for k in ("verdict", "culprit", "first_bad_node", "message", "hints")
            }
        return {
            "case": self.case.name,
            "file": self.case.file,
            "device": s.device,
            "dtype": s.dtype,
            "lr": s.lr,
            "epochs": s.epochs,
            "per_sample": s.per_sample,
            "seed": s.seed,
            "predict": self.predictions or None,
            "steps": self.steps,
            "progress": self.progress,
            "stopped": stopped,
            "error": self.error,
            "exit_code": self.exit_code,
        }


def batch_size(data: dict[str, torch.Tensor]) -> int:
    """The number of samples: the leading dimension every non-scalar datum shares."""
    sizes = {name: int(v.shape[0]) for name, v in data.items() if v.dim() > 0}
    if not sizes:
        raise UsageError("--per-sample needs data with a leading (sample) dimension; every datum is a scalar")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in sizes.items())
        raise UsageError(f"--per-sample needs one leading dimension shared by the data: {listed}")
    return next(iter(sizes.values()))


def at(value: torch.Tensor, index: int) -> torch.Tensor:
    """Sample `index` of a datum as a batch of one (the leading dimension kept, so code written
    for a batch takes it); a scalar datum is shared by every sample."""
    return value[index : index + 1] if value.dim() > 0 else value


def value_of(tensor: torch.Tensor) -> Any:
    """As the seed prints it: `.item()` for one number, nested lists for a tensor."""
    tensor = tensor.detach().cpu()
    return tensor.item() if tensor.numel() == 1 else tensor.tolist()


def printed(name: str, tensor: torch.Tensor) -> Any:
    """A number as `.item()` prints it (as the seed does); a tensor as its name, shape and norm."""
    if tensor.numel() == 1:
        return tensor.detach().cpu().item()
    shape = "×".join(map(str, tensor.shape))
    return f"{name}[{shape}, norm {float(tensor.detach().double().norm()):.8g}]"


def _step_record(
    step: int,
    epoch: int,
    index: int | None,
    loss: float,
    params: dict[str, torch.Tensor],
    numerical: Gradients,
    autograd: Gradients,
    manual: Gradients | None,
    verdict: str,
) -> dict[str, Any]:
    def of(source: Gradients | None, name: str) -> Any:
        return None if source is None or name not in source.values else value_of(source.values[name])

    return {
        "step": step,
        "epoch": epoch,
        "sample": index,
        "loss": loss,
        "params": {k: value_of(v) for k, v in params.items()},
        "gradients": {
            k: {"manual": of(manual, k), "numerical": of(numerical, k), "autograd": of(autograd, k)} for k in params
        },
        "verdict": verdict,
    }
