"""The benchmark model: a tanh MLP with an MSE loss, written three times over the same tensors —
as a backprop_check `Case` with its hand-derived backward pass, and as the plain function of its
parameters that `torch.autograd.gradcheck` takes.

    z1 = X·W1 + b1,  a1 = tanh(z1)
    z2 = a1·W2 + b2, a2 = tanh(z2)
    ŷ  = a2·W3 + b3
    loss = mean((ŷ − Y)²) over the N samples
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import backprop_check

SAMPLES = 8
NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")


@dataclass(frozen=True)
class Mlp:
    """Layer widths `inputs → hidden1 → hidden2 → 1`, with fixed seeded weights and batch."""

    inputs: int
    hidden1: int
    hidden2: int
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.inputs}→{self.hidden1}→{self.hidden2}→1"

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params().values())

    def params(self) -> dict[str, Tensor]:
        """Weights scaled by 1/√fan-in (so tanh is neither saturated nor linear), biases small."""
        gen = torch.Generator().manual_seed(self.seed)
        widths = (self.inputs, self.hidden1, self.hidden2, 1)
        params: dict[str, Tensor] = {}
        for layer, (fan_in, fan_out) in enumerate(zip(widths, widths[1:]), start=1):
            params[f"W{layer}"] = torch.randn(fan_in, fan_out, generator=gen, dtype=torch.float64) / fan_in**0.5
            params[f"b{layer}"] = 0.1 * torch.randn(fan_out, generator=gen, dtype=torch.float64)
        return params

    def data(self) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        X = torch.randn(SAMPLES, self.inputs, generator=gen, dtype=torch.float64)
        Y = torch.randn(SAMPLES, 1, generator=gen, dtype=torch.float64)
        return {"X": X, "Y": Y}


def forward(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, W3: Tensor, b3: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    a1 = torch.tanh(X @ W1 + b1)
    a2 = torch.tanh(a1 @ W2 + b2)
    y_hat = a2 @ W3 + b3
    return ((y_hat - Y) ** 2).mean()


def manual(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, W3: Tensor, b3: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    """The chain rule by hand, from the loss back to the first layer."""
    a1 = torch.tanh(X @ W1 + b1)  # forward values
    a2 = torch.tanh(a1 @ W2 + b2)
    y_hat = a2 @ W3 + b3
    dloss_dyhat = 2 * (y_hat - Y) / Y.numel()  # N×1
    dloss_dW3 = a2.T @ dloss_dyhat
    dloss_db3 = dloss_dyhat.sum(dim=0)  # b3 is added to every sample: sum over the batch
    dloss_da2 = dloss_dyhat @ W3.T
    dloss_dz2 = dloss_da2 * (1 - a2**2)  # tanh'(z) = 1 − tanh(z)²
    dloss_dW2 = a1.T @ dloss_dz2
    dloss_db2 = dloss_dz2.sum(dim=0)
    dloss_da1 = dloss_dz2 @ W2.T
    dloss_dz1 = dloss_da1 * (1 - a1**2)
    dloss_dW1 = X.T @ dloss_dz1
    dloss_db1 = dloss_dz1.sum(dim=0)
    return {"W1": dloss_dW1, "b1": dloss_db1, "W2": dloss_dW2, "b2": dloss_db2, "W3": dloss_dW3, "b3": dloss_db3}


@dataclass(frozen=True)
class Bug:
    """A planted slip in the manual gradient: element `index` of `param` scaled by `factor`."""

    param: str
    index: tuple[int, ...]
    factor: float

    def describe(self) -> str:
        return f"manual d{self.param}[{', '.join(map(str, self.index))}] × {self.factor:g}"


def make_case(mlp: Mlp, bug: Bug | None = None) -> backprop_check.Case:
    """The MLP as a three-way `Case` (given point only is what the benchmark checks)."""

    def mlp_manual(**values: Tensor) -> dict[str, Tensor]:
        grads = manual(**values)
        if bug is not None:
            grads[bug.param] = grads[bug.param].clone()
            grads[bug.param][bug.index] *= bug.factor
        return grads

    name = f"mlp_{mlp.size}" + ("_bug" if bug else "")
    made = backprop_check.case(params=mlp.params(), data=mlp.data(), name=name)(forward)
    made.manual(mlp_manual)
    return made


def gradcheck_target(mlp: Mlp) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    """The loss as a function of the parameters alone (data bound), and the parameters."""
    data = mlp.data()

    def loss(*params: Tensor) -> Tensor:
        return forward(**dict(zip(NAMES, params)), **data)

    params = mlp.params()
    return loss, tuple(params[name].clone().requires_grad_(True) for name in NAMES)
