"""Points: the values of every parameter and datum at which a case is checked.

Every case is checked at its given point and at random points: float parameters and float data
redrawn from a standard normal (same shapes), then the case's `sample` overrides. At the
tutorials' x = 1 a manual gradient that forgets the factor x looks right; at a random point not.
Values are kept in float64 on the CPU and cast for each run; a complex value is kept as its
float64 real view (shape + (2,)) and named in `Point.complex` (see complexes.py), so random
points redraw its real and imaginary parts alike.
"""
from __future__ import annotations

import reprlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backprop_check.model import complexes
from backprop_check.model.case import Case
from backprop_check.model.nn import Built
from backprop_check.errors import CaseError, line_in, one_line


@dataclass(frozen=True)
class Point:
    """One assignment of every parameter and datum; `seed` repeats a random one exactly."""

    label: str
    seed: int | None
    params: dict[str, torch.Tensor]
    data: dict[str, torch.Tensor]
    # With a `sample=`: the float values it leaves out, drawn from a standard normal (None: no sample=).
    redrawn: tuple[str, ...] | None = None
    # The names whose values are complex, kept here as their real views (complexes.py).
    complex: frozenset[str] = frozenset()
    # A module case's module, built from its seed for this check (None for other cases): the
    # forward runs it with `params` bound. It rides on the point, not on the user's Case.
    module: Built | None = field(default=None, compare=False)

    def cast(self, dtype: torch.dtype, device: str = "cpu") -> Point:
        """The point in `dtype` on `device`: float values are rounded, integer data stay."""
        return Point(
            self.label,
            self.seed,
            # copy=True: user code receives these, and must not be able to change the point
            {k: v.to(device=device, dtype=dtype, copy=True) for k, v in self.params.items()},
            {k: _cast_float(v, dtype, device) for k, v in self.data.items()},
            self.redrawn,
            complex=self.complex,
            module=self.module,
        )

    def rounded(self, dtype: torch.dtype) -> Point:
        """The point rounded to `dtype` and back to float64: where a `dtype` run really is."""
        if dtype == torch.float64:  # nothing to round: one copy, not two
            return self.cast(torch.float64)
        return self.cast(dtype).cast(torch.float64)

    def describe(self) -> str:
        return self.label if self.seed is None else f"{self.label} (seed {self.seed})"

    def constrain_hint(self) -> str:
        """What to change when the loss is not finite at (or a step away from) this point."""
        if self.seed is None:
            return "move the given point"
        if self.redrawn is None:
            return "constrain random points with sample="
        if self.redrawn:
            names = ", ".join(map(repr, self.redrawn))
            them = "it" if len(self.redrawn) == 1 else "them"
            return f"sample= leaves out {names}, so every random point draws {them} from a standard normal: return {them} from sample= too"
        return "the values sample= returns are outside the loss's domain: constrain them further"


def derive_seed(*parts: Any) -> int:
    """A stable seed from a run seed and names, independent of which cases are selected."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def given_point(case: Case, seed: int) -> Point:
    """The point the case file gives; callable parameters are drawn from a seeded generator."""
    gen = generator(derive_seed(seed, case.name, "given"))
    module = None
    if case.module is not None:
        module = Built(case, derive_seed(seed, case.name, "module"))
        params = module.initial_params()
    else:
        params = {name: _resolve(case, name, spec, gen) for name, spec in case.params.items()}
    data = {name: _resolve(case, name, spec, gen) for name, spec in case.data.items()}
    found = frozenset(name for name, value in {**params, **data}.items() if _is_complex(value))
    if found and case.numpy:
        raise CaseError(
            f"{sorted(found)[0]!r} is complex, and a numpy=True case checks real values only: "
            "drop numpy=True to check complex torch code"
        )
    if case.module is None:
        params = {name: as_float(name, value) for name, value in params.items()}
    data = {name: as_value(name, value) for name, value in data.items()}
    return Point("given point", None, params, data, complex=found, module=module)


def random_point(case: Case, given: Point, index: int, seed: int, attempt: int = 0) -> Point:
    """Random point number `index` (from 1); `attempt` > 0 redraws one that landed on a kink."""
    point_seed = derive_seed(seed, case.name, index, attempt)
    gen = generator(point_seed)
    params = {k: normal(v.shape, gen) for k, v in given.params.items()}
    data = {k: normal(v.shape, gen) if v.is_floating_point() else v for k, v in given.data.items()}
    if case.sample is not None:
        try:
            overrides = case.sample(gen)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            line = line_in(case.file, exc)
            raise CaseError(f"sample= raised {one_line(exc)}" + (f" (line {line})" if line else "")) from exc
        if not isinstance(overrides, Mapping):
            raise CaseError(f"sample= must return a dict, got {type(overrides).__name__}")
        for name, value in overrides.items():
            if name in params or name in data:
                _same_kind(name, value, name in given.complex)
            if name in params:
                params[name] = _sampled(as_float, name, value, name in given.complex)
                if params[name].shape != given.params[name].shape:
                    shape = _shown_shape(name, params[name].shape, given.complex)
                    raise CaseError(
                        f"sample= returns {name!r} with shape {shape}, "
                        f"but the parameter has shape {_shown_shape(name, given.params[name].shape, given.complex)}"
                    )
            elif name in data:
                data[name] = _sampled(as_value, name, value, name in given.complex)
            else:
                raise CaseError(f"sample= returns {name!r}, which is neither a parameter nor a datum")
    redrawn = None
    if case.sample is not None:
        # Not a function check's cotangents: fn's outputs do not depend on them, and a hint that
        # names them where the outputs are not finite points at the wrong thing.
        held = set(overrides) | set(case.cotangent_names())
        redrawn = tuple(k for k, v in {**given.params, **given.data}.items() if v.is_floating_point() and k not in held)
    return Point(f"random point {index}", point_seed, params, data, redrawn, complex=given.complex, module=given.module)


def within_given(case: Case, given: Point, index: int, seed: int, attempt: int = 0) -> Point | None:
    """Random point `index` for a case without `sample=` whose forward is not finite (or
    raises) at standard normal values (log, sqrt, a probability): every float value drawn
    uniformly between the smallest and largest finite value of its given tensor (a single value
    v: between v/2 and 3v/2), where the given point is in the domain; non-finite given elements
    stay. None where that moves nothing (every given tensor a single 0)."""
    if case.sample is not None:
        return None
    point_seed = derive_seed(seed, case.name, index, attempt, "within")
    gen = generator(point_seed)
    moved = False

    def draw(value: torch.Tensor) -> torch.Tensor:
        nonlocal moved
        if not value.is_floating_point() or not value.numel():
            return value
        finite = torch.isfinite(value)
        if not bool(finite.any()):
            return value
        lo, hi = float(value[finite].min()), float(value[finite].max())
        if lo == hi:
            lo, hi = sorted((lo / 2, lo * 3 / 2))
        if lo == hi:
            return value
        moved = True
        u = torch.rand(value.shape, generator=gen, dtype=torch.float64)
        drawn = (lo + (hi - lo) * u).float().double()  # as `normal`: float32 runs share the point
        return torch.where(finite, drawn, value.to(torch.float64))

    params = {k: draw(v) for k, v in given.params.items()}
    data = {k: draw(v) for k, v in given.data.items()}
    if not moved:
        return None
    return Point(f"random point {index}", point_seed, params, data, None, complex=given.complex, module=given.module)


def normal(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Standard normal draws in float64, rounded to float32: a float32 run then checks the very
    point the float64 run checks, and the two share its numerical reference (runner.py), the
    largest cost of a small check. The draws are as random as before; only their last 29 bits
    of mantissa are gone."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).float().double()


def _sampled(convert: Any, name: str, value: Any, complex_: bool) -> torch.Tensor:
    try:
        return convert(name, value, complex_)
    except CaseError as exc:
        raise CaseError(f"sample= for {name!r}: {exc}") from None


def _same_kind(name: str, value: Any, complex_: bool) -> None:
    """A real value stands for a complex one (its imaginary part zero); a complex value for a
    real one would change what the forward computes, and is said in one line."""
    if _is_complex(value) and not complex_:
        raise CaseError(
            f"sample= returns a complex {name!r}, but its given value is real: give a complex value at the "
            "given point too (e.g. 1+0j), or return a real one from sample="
        )


def _shown_shape(name: str, shape: torch.Size, complex_names: frozenset[str]) -> tuple[int, ...]:
    return tuple(shape[:-1]) if name in complex_names else tuple(shape)


def _is_complex(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_complex()
    if isinstance(value, complex):
        return True
    try:
        return bool(np.iscomplexobj(np.asarray(value)))
    except (TypeError, ValueError):
        return False


def as_value(name: str, value: Any, complex_: bool = False) -> torch.Tensor:
    """A datum as a CPU tensor: floats in float64, integers (labels) stay integer; a complex
    value (and with `complex_`, any number, its imaginary part zero) as its float64 real view."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            raise CaseError(f"{name!r} is not a number, array or tensor: got {reprlib.repr(value)}") from None
    if tensor.is_complex() or complex_:
        # Never cast to float64, where torch keeps only the real part (with a warning): a check
        # of what is left would pass a gradient that forgets a conjugate.
        if tensor.dtype == torch.bool:
            raise CaseError(f"{name!r} is complex at the given point, but got booleans here")
        return complexes.real_view(tensor)
    if tensor.is_floating_point():
        return tensor.to(torch.float64).clone()
    if tensor.dtype == torch.bool:
        return tensor.clone()
    return tensor.to(torch.long).clone()


def as_float(name: str, value: Any, complex_: bool = False) -> torch.Tensor:
    """A parameter as a float64 CPU tensor (an integer initial value becomes a float; a complex
    one, or any with `complex_`, its float64 real view)."""
    return as_value(name, value, complex_).to(torch.float64)


def with_data(point: Point, data: Mapping[str, torch.Tensor]) -> Point:
    """`point` with some of its data replaced."""
    return Point(point.label, point.seed, point.params, {**point.data, **data}, point.redrawn, complex=point.complex, module=point.module)


def _resolve(case: Case, name: str, spec: Any, gen: torch.Generator) -> Any:
    if not callable(spec) or isinstance(spec, torch.Tensor):
        return spec
    try:
        return spec(gen)
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        line = line_in(case.file, exc)
        raise CaseError(f"the initial value of {name!r} raised {one_line(exc)}" + (f" (line {line})" if line else "")) from exc


def _cast_float(value: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype, copy=True)
    return value.to(device, copy=True)
