"""Function mode: check `fn(*inputs)` as `torch.autograd.gradcheck` users hold it.

A function check is a `Case`, so everything the case path has applies to it (error bars,
float32 judged fairly, kinks, random points, element localisation, hints, every report format,
baselines). Its parameters are the differentiated inputs, its data the other tensor inputs and
one random cotangent v_k per floating or complex output, and its loss is

    Σ_k ⟨v_k, fn(*inputs)_k⟩,   with ⟨v, y⟩ = Σ Re(conj(v)·y) for a complex output,

whose gradient is the vector-Jacobian product Jᵀv that a backward computes
(`torch.autograd.grad(outputs, inputs, v)`: for a complex output y, Re(conj(v)·y) is the real
loss whose gradient with respect to y, in torch's convention dL/dRe y + i·dL/dIm y, is v).
Complex inputs are differentiated in torch's convention too, as their real views
(model/complexes.py); a complex cotangent is a complex datum, redrawn in both parts. A `.sum()` loss is
the cotangent v = 1, which hides a backward that ignores grad_output; a random v does not. The
cotangents are float data, so they are redrawn at every random point; at the given point they
are drawn from the seeded generator.

A hand-written VJP `manual(grad_outputs, *inputs)` is the third source. A wrong gradient is
named in the user's terms ("output 1 → x": the gradient of output 1 with respect to input `x`),
and at the given point the custom-Function contract is checked too (contract.py).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from backprop_check.dtypes import TABLE as DTYPE_TABLE
from backprop_check.model.case import Case, as_modes
from backprop_check.dtypes import name_of
from backprop_check.errors import CaseError, line_in, one_line
from backprop_check.model import complexes
from backprop_check.model.points import Point, generator

COTANGENT = "grad_output"
# The custom-Function contract's items (engine/contract.py checks them), all by default.
CONTRACT = ("grad_output", "undefined_grad", "repeatable", "grad_meta", "layout", "vmap", "in_place")
Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


class FunctionCase(Case):
    """`fn(*inputs)` checked through random cotangents (see the module docstring).

    `wrt` names the inputs to differentiate (default: the floating inputs that require grad,
    or all floating inputs when none does); `manual(grad_outputs, *inputs)` is a hand-written
    VJP; `contract` lists the custom-Function checks to run (CONTRACT); `nondet_tol` is
    how far two backward passes may differ.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: Inputs,
        *,
        name: str | None = None,
        manual: Callable[..., Any] | None = None,
        wrt: Iterable[str | int] | None = None,
        rtol: Any = None,
        atol: Any = None,
        sample: Callable[[Any], Mapping[str, Any]] | None = None,
        contract: Iterable[str] = CONTRACT,
        nondet_tol: float = 0.0,
        order: int = 1,
        modes: Sequence[str] = ("rev",),
        reference: Callable[..., Any] | None = None,
        dtypes: Sequence[str] | None = None,
    ) -> None:
        file, line = _where(fn)
        super().__init__(
            name=name or _name(fn), forward=self._forward, rtol=rtol, atol=atol, sample=sample, file=file, line=line,
            order=order, modes=as_modes(modes),
        )
        self.fn = fn
        self.label = _label(fn)
        self.broken: str | None = None
        self.notes: list[str] = []  # what the check left out or did differently, said in the report
        self.promoted = False  # fn closes over lower-precision tensors: float64 runs promote them
        self.demoted = False  # fn closes over float64 tensors: runs in a lower precision round them to it
        self.constants: dict[str, Any] = {}
        self.conjugated: tuple[str, ...] = ()  # inputs given as conjugate views (`z.conj()`)
        self.wrt: tuple[str, ...] = ()
        self.devices: tuple[str, ...] = ("cpu",)
        self.input_dtypes: tuple[str, ...] = ()
        self.cotangents: dict[int, str] = {}  # floating output index → datum name of its v
        self.output_shapes: list[tuple[int, ...]] | None = None  # learnt on first use
        self.vjp: Callable[..., Any] | None = None
        self.single = True  # fn returns one tensor, not a tuple
        self.only: int | None = None  # a copy that counts one output's cotangent only
        self.contract = tuple(item for item in contract)
        self.nondet_tol = float(nondet_tol)
        unknown = sorted(set(self.contract) - set(CONTRACT))
        if unknown:
            self.broken = f"contract= names {unknown[0]!r}; choose from {', '.join(CONTRACT)}"
        self.by_name = False  # inputs given as {name: value}: fn, manual and reference called by keyword
        self.names, values = self._unpack(inputs)
        if self.broken is None:
            self._classify(values, wrt)
        if manual is not None:
            self.manual(manual)
        # A kernel's reference implementation (engine/reference.py), and the dtypes the kernel
        # runs in: by default, with a reference, those of its low-precision inputs.
        self.reference = reference
        self.run_dtypes = _run_dtypes(self, dtypes, reference)
        self.output_dtypes: list[torch.dtype] = []
        self.reference_problem: tuple[str] | None = None

    # --- what the user gave -----------------------------------------------------------------

    def _unpack(self, inputs: Inputs) -> tuple[tuple[str, ...], list[Any]]:
        if isinstance(inputs, Mapping):  # fn(**inputs): each by its name, in any order
            self.by_name = True
            return tuple(str(k) for k in inputs), list(inputs.values())
        values = [inputs] if isinstance(inputs, torch.Tensor) or callable(inputs) else inputs
        if not isinstance(values, (tuple, list)):
            self.broken = f"inputs must be a tensor or a tuple of them, got {type(inputs).__name__}"
            return (), []
        return input_names(self.fn, len(values)), list(values)

    def _classify(self, specs: list[Any], wrt: Iterable[str | int] | None) -> None:
        """Sort the inputs into differentiated (params), other tensors (data) and constants."""
        gen = generator(0)
        tensors: dict[str, torch.Tensor] = {}
        for name, spec in zip(self.names, specs):
            value = spec
            if callable(spec) and not isinstance(spec, torch.Tensor):
                try:
                    value = spec(gen)
                except Exception as exc:  # noqa: BLE001 - user code may raise anything
                    self.broken = f"input `{name}` raised {one_line(exc)}"
                    return
                if not isinstance(value, torch.Tensor):
                    self.broken = f"input `{name}`'s generator returned {type(value).__name__}, not a tensor"
                    return
            problem = _not_an_input(name, value)
            if problem:
                self.broken = problem
                return
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            else:
                self.constants[name] = value
        chosen = self._chosen(tensors, wrt)
        if chosen is None:
            return
        self.wrt = chosen
        for name, spec in zip(self.names, specs):
            if name in tensors:
                kept = spec.detach() if isinstance(spec, torch.Tensor) else spec
                (self.params if name in chosen else self.data)[name] = kept
        self.conjugated = tuple(name for name, t in tensors.items() if t.is_conj())
        self.devices = tuple(dict.fromkeys(t.device.type for t in tensors.values())) or ("cpu",)
        floating = [_real_dtype(tensors[n].dtype) for n in chosen]
        self.input_dtypes = tuple(dict.fromkeys(name_of(d) for d in floating))

    def _chosen(self, tensors: dict[str, torch.Tensor], wrt: Iterable[str | int] | None) -> tuple[str, ...] | None:
        if wrt is not None:
            chosen = []
            for item in [wrt] if isinstance(wrt, (str, int)) else wrt:
                name = self.names[item] if isinstance(item, int) and 0 <= item < len(self.names) else item
                if name not in self.names:
                    self.broken = f"wrt= names {item!r}, which is not an input ({', '.join(self.names)})"
                    return None
                if name not in tensors:
                    self.broken = f"input `{name}` is in wrt= but is a {type(self.constants[name]).__name__}, not a tensor"
                    return None
                if not _differentiable(tensors[name]):
                    self.broken = (
                        f"input `{name}` is an integer tensor ({tensors[name].dtype}) marked to be differentiated "
                        "(wrt=): only floating-point and complex inputs have gradients"
                    )
                    return None
                chosen.append(name)
            return tuple(chosen)
        floating = [n for n, t in tensors.items() if _differentiable(t)]
        marked = [n for n in floating if tensors[n].requires_grad]
        if not floating:
            self.broken = "no input is a floating-point or complex tensor: there is nothing to differentiate"
            return None
        return tuple(marked or floating)

    def manual(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register `fn(grad_outputs, *inputs)`, a hand-written VJP returning one gradient per
        input (None for those not differentiated); `grad_outputs` is a tensor when `fn` returns
        one tensor, else a tuple (None for a non-floating output)."""
        self.vjp = fn
        self.manual_fn = self._manual
        return fn

    # --- the case the engine sees -----------------------------------------------------------

    def prepared(self) -> FunctionCase:
        """A copy of this case that knows fn's outputs (fn called once at the given inputs): their
        shapes and dtypes, one cotangent datum per differentiable output, and what was left out.
        The case itself stays as written."""
        if self.output_shapes is not None or self.broken:
            return self
        ready = self._copy()
        ready.data, ready.notes, ready.cotangents = dict(self.data), list(self.notes), {}
        try:
            ready._learn_outputs()
        except CaseError as exc:
            ready.broken = str(exc)
        return ready

    def problem(self) -> str | None:
        """Why this function cannot be checked, or None (asked of a case as written, fn is
        called once to learn its outputs, on a copy: `prepared`)."""
        if self.broken:
            return self.broken
        if self.output_shapes is None:
            return self.prepared().problem()
        if self.vjp is not None:
            try:
                signature = inspect.signature(self.vjp)
                if self.by_name:
                    signature.bind(None, **dict.fromkeys(self.names))
                else:
                    signature.bind(None, *self.names)
            except TypeError as exc:
                return f"the manual VJP cannot be called as manual(grad_outputs, {', '.join(self.names)}): {exc}"
            except ValueError:
                pass
        if self.reference is not None:
            if self.reference_problem is None:  # the reference is called once, not at every ask
                self.reference_problem = (self._reference_problem() or "",)
            if self.reference_problem[0]:
                return self.reference_problem[0]
        return super().problem()

    def _arguments_problem(self, names: set[str]) -> str | None:
        """None: the forward is this case's own `_forward(**values)`, called with its own names
        (fn's signature is what `_unpack` and the call itself check)."""
        return None

    def _learn_outputs(self) -> None:
        gen = generator(0)
        values = {}
        for name in self.names:
            spec = self.params.get(name, self.data.get(name))
            if spec is not None:
                values[name] = spec(gen) if callable(spec) and not isinstance(spec, torch.Tensor) else spec
        # With grad on, to learn which outputs autograd declares non-differentiable.
        leaves = {n: v.detach().requires_grad_(True) if n in self.wrt and isinstance(v, torch.Tensor) else v for n, v in values.items()}
        try:
            with torch.enable_grad():
                returned = self._invoke(leaves)
        except CaseError:  # fn writes into its inputs, say: the guards say so in their words
            with torch.no_grad():
                returned = self._invoke(values)
        outputs = as_outputs(returned, self.label)
        self.single = not isinstance(returned, (tuple, list))
        self.output_shapes = [tuple(o.shape) for o in outputs]
        self.output_dtypes = [o.dtype for o in outputs]
        taken = set(self.names)
        left_out = _left_out(outputs)
        if left_out:
            self.notes.append(
                f"output{'s' * (len(left_out) > 1)} {', '.join(map(str, left_out))} "
                f"{'are' if len(left_out) > 1 else 'is'} left out: autograd declares "
                f"{'them' if len(left_out) > 1 else 'it'} non-differentiable (requires_grad=False, as "
                "ctx.mark_non_differentiable or an op's saved statistics), so no backward is defined for "
                f"{'them' if len(left_out) > 1 else 'it'} (torch's gradcheck leaves such outputs out too)"
            )
        for k, output in enumerate(outputs):
            if _differentiable(output) and k not in left_out:
                label = f"{COTANGENT}{k}"
                while label in taken:
                    label += "_"
                self.cotangents[k] = label
                self.data[label] = _Cotangent(tuple(output.shape), output.is_complex())
        if not self.cotangents:
            raise CaseError(f"{self.label} returns no floating-point or complex output: there is no gradient to check")

    def _call(self, values: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """fn(*inputs) as a tuple of checked outputs."""
        return as_outputs(self._invoke(values), self.label)

    def _invoke(self, values: Mapping[str, Any]) -> Any:
        """fn(*inputs); what it raises is one line naming it."""
        args = self._args(values)
        low = _below_float64(values) if self.demoted else None  # asked again where fn fails
        try:
            if self.promoted and _float64(values):
                with Promote():
                    return self._apply(self.fn, args)
            if low is not None:
                with Demote(low):
                    return self._apply(self.fn, args)
            return self._apply(self.fn, args)
        except CaseError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise anything
            low = _below_float64(values)
            if not self.promoted and _float64(values) and _dtype_clash(exc) and self._runs(args, Promote()):
                self.promoted = True
                self.notes.append(PROMOTED_NOTE)
                return self._invoke(values)
            if not self.demoted and low is not None and _dtype_clash(exc) and self._runs(args, Demote(low)):
                self.demoted = True
                self.notes.append(DEMOTED_NOTE)
                return self._invoke(values)
            line = line_in(self.file, exc)
            said = f"{self.label} raised {one_line(exc)}" + (f" (line {line})" if line else "")
            raise CaseError(said + self._refuses_float64(args, exc)) from exc

    def _apply(self, f: Callable[..., Any], args: list[Any], *first: Any) -> Any:
        """f(*first, *args), or with each input by its name where the inputs were a dict."""
        return f(*first, **dict(zip(self.names, args))) if self.by_name else f(*first, *args)

    def _args(self, values: Mapping[str, Any]) -> list[Any]:
        """fn's arguments, in order: an input given as a conjugate view is handed on as one (a
        kernel's conjugate path is the one checked), holding the same values."""
        args = [values[n] if n in values else self.constants[n] for n in self.names]
        for k, name in enumerate(self.names) if self.conjugated else ():
            if name in self.conjugated and isinstance(args[k], torch.Tensor) and args[k].is_complex() and not args[k].is_conj():
                args[k] = args[k].conj().resolve_conj().conj()
        return args

    def _runs(self, args: list[Any], mode: torch.overrides.TorchFunctionMode) -> bool:
        """Whether fn runs once every tensor an op receives is cast by `mode` (Promote, Demote):
        the dtype clash was the only trouble (else fn's own error stands)."""
        try:
            with mode:
                self._apply(self.fn, args)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            return False
        return True

    def _refuses_float64(self, args: list[Any], exc: BaseException | None = None) -> str:
        """What to do when a function given in low precision fails in float64: a kernel, or a
        module of another dtype that checks its input's dtype in Python (nn.RNN), which no
        promotion of what its ops receive can reach."""
        wide = any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)
        low = bool(self.input_dtypes) and "float64" not in self.input_dtypes
        if not wide or not low or self.reference is not None or getattr(self, "is_reference", False):
            return ""
        if exc is not None and "dtype" in str(exc) and "does not match" in str(exc):
            return (
                f"; it fails in float64, which the numerical referee needs: {self.label} mixes its inputs with "
                f"{'/'.join(self.input_dtypes)} tensors it holds (a module's weights) and checks their dtypes itself: "
                "build it in float64 for the check (module.double()), or give reference="
            )
        return (
            f"; it fails in float64, which the numerical referee needs: a kernel that runs in "
            f"{'/'.join(self.input_dtypes)} only is checked against a reference, so give reference=, a plain "
            "torch version of it that runs in float64"
        )

    # --- a reference implementation (engine/reference.py) ---------------------------------

    def twin(self) -> FunctionCase:
        """This check with the reference in place of the kernel: what the float64 referee
        checks, at the same points (same name, inputs and cotangents)."""
        twin = self._copy()
        twin.fn, twin.reference, twin.is_reference = self.reference, None, True
        twin.label = f"the reference {_label(self.reference)}"
        twin.vjp, twin.manual_fn, twin.contract = None, None, ()
        twin.file, twin.line = _where(self.reference)
        return twin

    def _reference_problem(self) -> str | None:
        """Why the reference cannot serve as one, or None: it must return what the kernel
        returns (number, shapes, kinds of dtype), computed in float64 on the CPU."""
        if not callable(self.reference):
            return f"reference= must be a function with the kernel's signature, got {type(self.reference).__name__}"
        if self.vjp is not None:
            return "manual= and reference= together: a kernel is checked against its reference (give one of them)"
        if self.modes != ("rev",):
            return "modes= with reference=: a kernel is checked against its reference in reverse mode only"
        label = f"the reference {_label(self.reference)}"
        gen = generator(0)
        args = []
        for name in self.names:
            spec = self.params.get(name, self.data.get(name, self.constants.get(name)))
            value = spec(gen) if callable(spec) and not isinstance(spec, torch.Tensor) else spec
            if isinstance(value, torch.Tensor):
                value = value.to("cpu", _wide(value.dtype) if _differentiable(value) else value.dtype)
            args.append(value)
        try:
            with torch.no_grad():
                returned = self._apply(self.reference, args)
            outputs = as_outputs(returned, label)
        except CaseError as exc:
            return str(exc)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code may raise anything
            return f"{label} raised {one_line(exc)} in float64 on the CPU: a reference must run there (plain torch)"
        if len(outputs) != len(self.output_dtypes):
            return f"{label} returns {len(outputs)} output(s), the kernel {len(self.output_dtypes)}: they must return the same"
        for k, (theirs, dtype, shape) in enumerate(zip(outputs, self.output_dtypes, self.output_shapes or [])):
            if tuple(theirs.shape) != shape:
                return f"output {k} of {label} has shape {tuple(theirs.shape)}, the kernel's {shape}"
            kinds = [_kind(theirs.dtype), _kind(dtype)]
            if kinds[0] != kinds[1]:
                return f"output {k} of {label} is {kinds[0]} ({theirs.dtype}), the kernel's {kinds[1]} ({dtype})"
            if _differentiable(theirs) and theirs.dtype not in (torch.float64, torch.complex128):
                name = name_of(theirs.dtype)
                return (
                    f"output {k} of {label} is {name} for float64 inputs: the reference runs in low precision only, "
                    "and a reference must compute in float64 (its error at the kernel's precision is the tolerance)"
                )
        return None

    def _forward(self, **values: torch.Tensor) -> torch.Tensor:
        outputs = self._call(values)
        total: torch.Tensor | None = None
        for k, label in self.cotangents.items():
            if self.only is not None and k != self.only:
                continue
            v = values[label]
            if k >= len(outputs) or outputs[k].shape != v.shape:
                got = "no output" if k >= len(outputs) else f"shape {tuple(outputs[k].shape)}"
                raise CaseError(f"output {k} of {self.label} has {got} here, but shape {tuple(v.shape)} at the given inputs")
            if outputs[k].is_complex() != v.is_complex():
                kinds = ("complex", "real") if outputs[k].is_complex() else ("real", "complex")
                raise CaseError(f"output {k} of {self.label} is {kinds[0]} here, but {kinds[1]} at the given inputs")
            # Re(conj(v)·y): the real loss whose torch gradient with respect to y is v
            term = (v.conj() * outputs[k]).real.sum() if v.is_complex() else (v * outputs[k]).sum()
            total = term if total is None else total + term
        return total if total is not None else torch.zeros((), dtype=next(iter(values.values())).dtype)

    def _manual(self, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        args = self._args(values)
        grads = []
        for k in range(len(self.output_shapes or ())):
            label = self.cotangents.get(k)
            if label is None:
                grads.append(None)
            elif self.only is not None and k != self.only:
                grads.append(torch.zeros_like(values[label]))
            else:
                grads.append(values[label])
        grad_outputs = grads[0] if self.single else tuple(grads)
        returned = self._apply(self.vjp, args, grad_outputs)  # type: ignore[arg-type]
        if not isinstance(returned, (tuple, list)):
            returned = (returned,)
        if len(returned) != len(self.names):
            raise CaseError(
                f"the manual VJP returned {len(returned)} gradient{'s' * (len(returned) != 1)} for "
                f"{len(self.names)} input{'s' * (len(self.names) != 1)} ({', '.join(self.names)}): "
                "return one per input, None for those not differentiated"
            )
        gradients = {}
        for name, value in zip(self._returned_order(), returned):
            if name not in self.wrt:
                continue
            if value is None:
                raise CaseError(f"the manual VJP returned None for input `{name}`, which is differentiated")
            gradients[name] = value
        return gradients

    def _returned_order(self) -> tuple[str, ...]:
        """The inputs the manual VJP's gradients are for, in the order it returns them: its own
        parameters' order where the inputs were a dict it names (manual(g, a, b) returns (da, db),
        whatever the dict's order), else the inputs' order."""
        if self.by_name and self.vjp is not None:
            try:
                named = [p for p in inspect.signature(self.vjp).parameters][1:]
            except (TypeError, ValueError):
                return self.names
            if sorted(named[: len(self.names)]) == sorted(self.names):
                return tuple(named[: len(self.names)])
        return self.names

    def cotangent_names(self) -> tuple[str, ...]:
        return tuple(self.cotangents.values())

    def outputs(self, at: Point) -> tuple[torch.Tensor, ...]:
        """fn's floating outputs at `at` (what its jvp gives tangents of)."""
        outputs = self._call(complexes.for_user({**at.params, **at.data}, at.complex))
        return tuple(outputs[k] for k in self.cotangents if k < len(outputs))

    def output_names(self) -> tuple[str, ...]:
        return tuple(f"output {k}" for k in self.cotangents)

    def paired_outputs(self, at: Point) -> dict[str, torch.Tensor]:
        """The outputs the loss pairs with its cotangents, by cotangent name: the loss is the sum
        of Re⟨v, output⟩ over them (`_forward`)."""
        outputs = self._call(complexes.for_user({**at.params, **at.data}, at.complex))
        return {
            label: outputs[k]
            for k, label in self.cotangents.items()
            if (self.only is None or k == self.only) and k < len(outputs)
        }

    def for_output(self, k: int) -> FunctionCase:
        """This case with only output `k`'s cotangent: its loss is ⟨v_k, output_k⟩."""
        one = self._copy()
        one.only = k
        return one

    def _copy(self) -> FunctionCase:
        """A shallow copy whose forward and manual gradient are its own (bound to the copy)."""
        other = copy.copy(self)
        other.forward = other._forward
        if self.vjp is not None:
            other.manual_fn = other._manual
        return other

def _run_dtypes(case: FunctionCase, dtypes: Sequence[str] | None, reference: Any) -> tuple[str, ...] | None:
    """The dtypes a kernel with a reference runs in (None: the run's); an unknown name breaks
    the case with one line."""
    if dtypes is not None:
        chosen = (dtypes,) if isinstance(dtypes, str) else tuple(name_of(d) for d in dtypes)
        unknown = [d for d in chosen if d not in DTYPE_TABLE]
        if unknown and case.broken is None:
            case.broken = f"dtypes= names {unknown[0]!r}; choose from {', '.join(DTYPE_TABLE)}"
        return chosen or None
    if reference is None:
        return None
    low = tuple(d for d in case.input_dtypes if d != "float64")
    return low or None


def _kind(dtype: torch.dtype) -> str:
    return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else "integer"


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


PROMOTED_NOTE = (
    "fn closes over floating tensors of a lower precision than float64 (running statistics, weights): "
    "in the float64 runs (the reference) every floating tensor an op receives is promoted to float64, "
    "which holds their values exactly, so the reference is the same function in float64 with its usual error bar"
)


DEMOTED_NOTE = (
    "fn closes over float64 tensors (weights, constants): in the runs below float64 every float64 tensor an op "
    "receives is rounded to the run's dtype, as the inputs are, so those runs check the function in that dtype"
)


def cast_notes(case: Any, dtype_name: str) -> list[str]:
    """The note a run below float64 carries where fn's float64 tensors are rounded to its dtype
    (learnt at its first call, after the notes of the given point were taken)."""
    return [DEMOTED_NOTE] if getattr(case, "demoted", False) and dtype_name not in ("float64", "complex128") else []


def promoted(case: Any, dtype: torch.dtype) -> Any:
    """Promote for a float64 run of a function check that closes over lower-precision tensors,
    Demote for a lower-precision run of one that closes over float64 tensors (a manual VJP runs
    outside `_invoke`), else nothing. A custom backward that recomputes fn is not cast:
    torch.autograd.grad runs the engine outside any torch function mode."""
    if getattr(case, "promoted", False) and dtype == torch.float64:
        return Promote()
    if getattr(case, "demoted", False) and dtype != torch.float64 and dtype.is_floating_point:
        return Demote(dtype)
    return contextlib.nullcontext()


def _below_float64(values: Mapping[str, Any]) -> torch.dtype | None:
    """The run's floating dtype where it is below float64 (no float64 or complex128 value), else None."""
    floating = [v.dtype for v in values.values() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())]
    if not floating or any(d in (torch.float64, torch.complex128) for d in floating):
        return None
    low = [d for d in floating if d.is_floating_point]
    return low[0] if low else torch.float32


def _float64(values: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype in (torch.float64, torch.complex128) for v in values.values())


def _dtype_clash(exc: BaseException) -> bool:
    """Whether fn failed because float64 inputs met tensors of another floating dtype."""
    text = str(exc)
    if not isinstance(exc, RuntimeError):
        return False
    # torch's kernels that say no dtype by name: layer, batch, group and instance norm ("mixed
    # dtype (CPU): all inputs must share same datatype"), prelu ("Type promoting not supported")
    if any(words in text for words in ("mixed dtype", "same datatype", "Type promoting")):
        return True
    return any(
        words in text
        for words in ("expected scalar type", "same dtype", "expected both", "Expected object of scalar type", "dtype", " type (")
    ) and any(name in text for name in ("Double", "Float", "float64", "float32", "Half", "BFloat16", "double", "float"))


class Promote(torch.overrides.TorchFunctionMode):
    """Every float32/float16/bfloat16 tensor an op receives becomes float64 (complex64: complex128)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        return func(*_promoted(args), **_promoted(kwargs))


class Demote(torch.overrides.TorchFunctionMode):
    """Every float64 tensor an op receives becomes `dtype` (complex128: complex64)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        return func(*_cast(args, self.dtype), **_cast(kwargs, self.dtype))


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.float64:
            return value.to(dtype)
        if value.dtype == torch.complex128:
            return value.to(torch.complex64)
        return value
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if type(value) is tuple:  # a namedtuple or torch.Size is passed as it is
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _promoted(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return value.to(torch.float64)
        if value.dtype == torch.complex64:
            return value.to(torch.complex128)
        return value
    if isinstance(value, list):
        return [_promoted(v) for v in value]
    if type(value) is tuple:  # a namedtuple or torch.Size is passed as it is
        return tuple(_promoted(v) for v in value)
    if isinstance(value, dict):
        return {k: _promoted(v) for k, v in value.items()}
    return value


class _Cotangent:
    """A random cotangent of an output's shape, drawn from the point's generator; for a complex
    output, complex with both parts standard normal (as random points redraw them)."""

    def __init__(self, shape: tuple[int, ...], complex_: bool = False) -> None:
        self.shape = shape
        self.complex = complex_

    def __call__(self, gen: torch.Generator) -> torch.Tensor:
        if self.complex:
            return torch.view_as_complex(torch.randn((*self.shape, 2), generator=gen, dtype=torch.float64))
        return torch.randn(self.shape, generator=gen, dtype=torch.float64)


def _left_out(outputs: tuple[torch.Tensor, ...]) -> list[int]:
    """The floating outputs autograd declares non-differentiable, where another one is not
    (a function none of whose outputs requires grad is checked as before: its gradient is 0)."""
    floating = [k for k, o in enumerate(outputs) if _differentiable(o)]
    live = [k for k in floating if outputs[k].requires_grad]
    return [k for k in floating if k not in live] if live else []


def _differentiable(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The run dtype a tensor of `dtype` is checked in: a complex one's parts' dtype."""
    return dtype.to_real() if dtype.is_complex else dtype


def as_outputs(returned: Any, label: str) -> tuple[torch.Tensor, ...]:
    """The outputs of fn as a tuple of tensors; anything else is one line naming the output."""
    outputs = returned if isinstance(returned, (tuple, list)) else (returned,)
    if not isinstance(returned, (tuple, list, torch.Tensor)):
        raise CaseError(f"{label} returned {type(returned).__name__}, not a tensor or a tuple of tensors")
    if not outputs:
        raise CaseError(f"{label} returned an empty {type(returned).__name__}: there is no output to check")
    for k, output in enumerate(outputs):
        if not isinstance(output, torch.Tensor):
            raise CaseError(f"output {k} of {label} is {type(output).__name__}, not a tensor")
        if output.dtype == torch.complex32:
            raise CaseError(f"output {k} of {label} is complex32, which torch barely computes with: return complex64 or complex128")
    return tuple(outputs)


def _not_an_input(name: str, value: Any) -> str | None:
    """Why `value` cannot be an input of a function check, or None (tensors and constants)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.complex32:
            return f"input `{name}` is complex32, which torch barely computes with: pass complex64 or complex128"
        if value.is_sparse or value.layout != torch.strided:
            return f"input `{name}` has layout {value.layout}: only dense (strided) tensors can be checked"
        return None
    if isinstance(value, np.ndarray):
        return (
            f"input `{name}` is a numpy array, not a tensor: check() differentiates torch code (pass "
            "torch.from_numpy(...) where fn computes with torch); a numpy forward with its hand-written backward "
            "is checked with check_layer(forward, backward, inputs) or @case(numpy=True)"
        )
    if isinstance(value, (list, tuple)) and not _all_integers(value):
        return (
            f"input `{name}` is a {type(value).__name__} of numbers, not a tensor: pass torch.tensor(...) to "
            "differentiate it (only tensors are differentiated; other inputs are passed through as they are)"
        )
    return None


def _all_integers(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_all_integers(v) for v in value)
    return isinstance(value, (int, bool, type(None)))


def input_names(fn: Callable[..., Any], count: int) -> tuple[str, ...]:
    """`fn`'s positional parameter names for `count` inputs; `input0`, `input1`, … where it has
    none (a builtin, `*args`). For `MyFunction.apply`, the names of its forward's inputs."""
    target = fn
    owner = getattr(fn, "__self__", None)
    if inspect.isclass(owner) and issubclass(owner, torch.autograd.Function):
        target = owner.forward
    names: list[str] = []
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    if target is not fn and parameters and not _has_setup_context(owner):
        parameters = parameters[1:]  # forward(ctx, ...)
    for parameter in parameters:
        if parameter.kind is parameter.VAR_POSITIONAL:
            break
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
    names = names[:count] + [f"input{i}" for i in range(len(names), count)]
    seen: set[str] = set()
    unique = []
    for i, name in enumerate(names):
        unique.append(name if name not in seen else f"input{i}")
        seen.add(unique[-1])
    return tuple(unique)


def _has_setup_context(cls: type) -> bool:
    base = getattr(torch.autograd.Function, "setup_context", None)
    return getattr(cls, "setup_context", base) is not base


def _label(fn: Callable[..., Any]) -> str:
    owner = getattr(fn, "__self__", None)
    if inspect.isclass(owner):
        return f"{owner.__name__}.{getattr(fn, '__name__', 'apply')}"
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _name(fn: Callable[..., Any]) -> str:
    owner = getattr(fn, "__self__", None)
    if inspect.isclass(owner):
        return owner.__name__
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "function" if name == "<lambda>" else name


def _where(fn: Callable[..., Any]) -> tuple[str | None, int | None]:
    owner = getattr(fn, "__self__", None)
    code = getattr(fn, "__code__", None)
    if code is not None and not inspect.isclass(owner):  # `MyFunction.apply` is torch's code
        return code.co_filename, code.co_firstlineno
    try:
        target = owner if inspect.isclass(owner) else fn
        return inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        return None, None


