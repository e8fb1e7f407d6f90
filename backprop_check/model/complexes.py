"""Complex values: kept as their real views, handed to user code as complex tensors.

PyTorch's convention: for a real loss L of z = x + iy, `z.grad` is ∂L/∂x + i·∂L/∂y (that is
2·∂L/∂z̄, the conjugate Wirtinger derivative times torch's factor 2). So the gradient of the
real view `torch.view_as_real(z)` (shape + (2,), the last index 0 for the real part, 1 for the
imaginary one) is exactly `view_as_real(z.grad)`: the complex gradient is two real gradients.

The harness therefore keeps a complex value in its Point as the float64 real view and names it
in `Point.complex`. The engine, the numerical referee (a step along the real or the imaginary
part of one element, with its error bar), the float32 rounding allowances, the localisation of
wrong elements, random directions, baselines and every report format then work on real numbers,
unchanged. Only where user code is called is the real view turned back into a complex tensor
(complex128 in a float64 run, complex64 in a float32 one): the forward and the manual gradient
receive complex values, autograd's leaf is the real view (so a custom Function's backward still
sees complex gradients), and a manual gradient of a complex parameter comes back as the real
view of the complex gradient it returns.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from backprop_check.errors import CaseError

# The real dtypes whose pairs torch holds as a complex number; float16 pairs (complex32) have
# almost no operators, bfloat16 pairs none.
COMPLEX_OF = {torch.float64: torch.complex128, torch.float32: torch.complex64}
CONVENTION = (
    "torch's convention for a real loss L of z = x + iy is dL/dx + i·dL/dy (= 2·∂L/∂z̄, the conjugate "
    "Wirtinger derivative with torch's factor 2)"
)

def real_view(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as a float64 real view of its own (shape + (2,)); a conjugate view
    (`z.conj()`, whose conjugation is a bit, not data) by its values."""
    return torch.view_as_real(tensor.detach().cpu().to(torch.complex128).resolve_conj()).clone()


def as_complex(name: str, view: torch.Tensor) -> torch.Tensor:
    """The complex tensor whose real view is `view`, in the complex dtype of the run's dtype;
    a differentiable view, so a gradient reaching it reaches `view` as its real view."""
    if view.dtype not in COMPLEX_OF:
        raise CaseError(
            f"{name!r} is complex, and a {str(view.dtype).removeprefix('torch.')} run cannot hold it: torch "
            "computes with complex64 and complex128 only, so check complex values in float32 or float64"
        )
    try:
        return torch.view_as_complex(view)
    except RuntimeError:  # a slice of a larger buffer (odd offset, strides): a copy of its own
        return torch.view_as_complex(view.clone(memory_format=torch.contiguous_format))


def for_user(values: Mapping[str, Any], complex_names: Collection[str]) -> dict[str, Any]:
    """`values` with each complex name's real view turned back into a complex tensor (one that
    is complex already, handed on by the derivative of order 2, stays as it is)."""
    if not complex_names:
        return dict(values)
    return {
        k: as_complex(k, v) if k in complex_names and isinstance(v, torch.Tensor) and not v.is_complex() else v
        for k, v in values.items()
    }


def gradient_view(name: str, value: torch.Tensor, source: str = "manual gradient") -> torch.Tensor:
    """The real view of the complex gradient `value` of complex parameter `name`; a real one is
    a slip of the derivation's convention, said in one line."""
    if not value.is_complex():
        raise CaseError(
            f"the {source} for {name!r} is real ({str(value.dtype).removeprefix('torch.')}), but {name!r} is "
            f"complex: return the complex gradient dL/dx + i·dL/dy ({CONVENTION})"
        )
    return torch.view_as_real(value.resolve_conj() if value.is_conj() else value)




def mark(checks: list[Any], complex_names: Collection[str]) -> None:
    """Mark the checks of complex tensors, so that they are shown in complex terms."""
    for check in checks:
        if check.name in complex_names and check.kind in ("param", "node"):
            check.complex = True
