"""The soundness benchmark's model: a tanh MLP classifier with a softmax cross-entropy loss over
integer labels, of any widths, written as a backprop_check `Case` three ways:

- three-way: the forward pass with a hand-written backward pass (`.manual`) that may carry a
  planted slip (one element of one weight gradient scaled by a factor);
- two-way: no manual gradient; the forward pass runs the layer with the slip through a custom
  `torch.autograd.Function` whose backward carries it, so autograd is the wrong source;
- and as the plain function of its parameters that `torch.autograd.gradcheck` takes.

    a0 = X,  z_l = a_{l-1}·W_l + b_l,  a_l = tanh(z_l) for the hidden layers
    loss = mean over the N samples of −log softmax(z_L)[label]
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import backprop_check


@dataclass(frozen=True)
class Classifier:
    """Layer widths `inputs → hidden… → classes`, a batch of `batch` samples, all seeded."""

    widths: tuple[int, ...]
    batch: int = 16
    seed: int = 0

    @property
    def label(self) -> str:
        return "→".join(map(str, self.widths))

    @property
    def layers(self) -> int:
        return len(self.widths) - 1

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{kind}{layer}" for layer in range(1, self.layers + 1) for kind in ("W", "b"))

    @property
    def size(self) -> int:
        return sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(self.widths, self.widths[1:]))

    def shape(self, name: str) -> tuple[int, ...]:
        layer = int(name[1:])
        fan_in, fan_out = self.widths[layer - 1], self.widths[layer]
        return (fan_in, fan_out) if name[0] == "W" else (fan_out,)

    def draw(self, gen: torch.Generator) -> dict[str, Tensor]:
        """Weights scaled by 1/√fan-in (tanh neither saturated nor linear), biases small."""
        params: dict[str, Tensor] = {}
        for layer, (fan_in, fan_out) in enumerate(zip(self.widths, self.widths[1:]), start=1):
            params[f"W{layer}"] = torch.randn(fan_in, fan_out, generator=gen, dtype=torch.float64) / fan_in**0.5
            params[f"b{layer}"] = 0.1 * torch.randn(fan_out, generator=gen, dtype=torch.float64)
        return params

    def params(self) -> dict[str, Tensor]:
        return self.draw(torch.Generator().manual_seed(self.seed))

    def data(self) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        X = torch.randn(self.batch, self.widths[0], generator=gen, dtype=torch.float64)
        labels = torch.randint(0, self.widths[-1], (self.batch,), generator=gen)
        return {"X": X, "labels": labels}


@dataclass(frozen=True)
class Bug:
    """A planted slip: element `index` of the gradient of `param` scaled by `factor`."""

    param: str
    index: tuple[int, ...]
    factor: float

    @property
    def where(self) -> str:
        """`W1[3, 7]`, as the harness labels an element."""
        return f"{self.param}[{', '.join(map(str, self.index))}]"

    def describe(self) -> str:
        return f"d{self.where} × {self.factor:g}"


class SlippedLinear(torch.autograd.Function):
    """`x·W + b` with a hand-written backward whose dW has one element scaled (the planted bug).

    Written in the `setup_context` style with a generated vmap rule, as torch asks of a
    Function used under `torch.func` transforms (the harness batches forward passes with vmap).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, W: Tensor, b: Tensor, index: tuple[int, ...], factor: float) -> Tensor:  # type: ignore[override]
        return x @ W + b

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:  # type: ignore[override]
        x, W, _, index, factor = inputs
        ctx.save_for_backward(x, W)
        ctx.index, ctx.factor = index, factor

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W = ctx.saved_tensors
        dW = x.T @ grad
        dW[ctx.index] *= ctx.factor
        return grad @ W.T, dW, grad.sum(dim=0), None, None


def forward(values: dict[str, Tensor], layers: int, bug: Bug | None = None) -> Tensor:
    """The loss; the layer named by `bug` (if any) runs through `SlippedLinear`."""
    a = values["X"]
    for layer in range(1, layers + 1):
        W, b = values[f"W{layer}"], values[f"b{layer}"]
        z = SlippedLinear.apply(a, W, b, bug.index, bug.factor) if bug and bug.param == f"W{layer}" else a @ W + b
        a = torch.tanh(z) if layer < layers else z
    return torch.nn.functional.cross_entropy(a, values["labels"])


def manual(values: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """The chain rule by hand, from the loss back to the first layer."""
    acts = [values["X"]]  # forward values a0 … a_{L-1}
    for layer in range(1, layers):
        acts.append(torch.tanh(acts[-1] @ values[f"W{layer}"] + values[f"b{layer}"]))
    logits = acts[-1] @ values[f"W{layers}"] + values[f"b{layers}"]
    labels = values["labels"]
    # d mean(−log softmax(z)[y]) / dz = (softmax(z) − onehot(y)) / N
    dz = torch.softmax(logits, dim=1)
    dz[torch.arange(labels.numel()), labels] -= 1
    dz = dz / labels.numel()
    grads: dict[str, Tensor] = {}
    for layer in range(layers, 0, -1):
        grads[f"W{layer}"] = acts[layer - 1].T @ dz
        grads[f"b{layer}"] = dz.sum(dim=0)  # b is added to every sample: sum over the batch
        if layer > 1:
            da = dz @ values[f"W{layer}"].T
            dz = da * (1 - acts[layer - 1] ** 2)  # tanh'(z) = 1 − tanh(z)²
    return grads


def make_case(model: Classifier, bug: Bug | None = None, two_way: bool = False) -> backprop_check.Case:
    """The classifier as a `Case`: three-way with the slip in `.manual`, or two-way with it in autograd.

    Random points redraw the weights as the given point draws them (`sample=`), so that a wide
    layer stays out of tanh's saturation; the labels are integer data and stay as they are.
    """
    layers = model.layers

    def classifier(**values: Tensor) -> Tensor:
        return forward(values, layers, bug if two_way else None)

    def classifier_manual(**values: Tensor) -> dict[str, Tensor]:
        grads = manual(values, layers)
        if bug is not None:
            grads[bug.param][bug.index] *= bug.factor
        return grads

    name = f"mlp_{model.size}" + ("_two_way" if two_way else "") + (f"_bug_{bug.where}" if bug else "")
    made = backprop_check.case(params=model.params(), data=model.data(), sample=model.draw, name=name)(classifier)
    if not two_way:
        made.manual(classifier_manual)
    return made


def gradient(model: Classifier) -> dict[str, Tensor]:
    """The true gradient at the given point (autograd, float64), to choose elements by magnitude."""
    params = {name: value.requires_grad_(True) for name, value in model.params().items()}
    forward(params | model.data(), model.layers).backward()
    return {name: value.grad for name, value in params.items() if value.grad is not None}


def gradcheck_target(model: Classifier) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    """The loss as a function of the parameters alone (data bound), and the parameters."""
    data, names = model.data(), model.names

    def loss(*params: Tensor) -> Tensor:
        return forward(dict(zip(names, params)) | data, model.layers)

    params = model.params()
    return loss, tuple(params[name].clone().requires_grad_(True) for name in names)
