"""Planted bugs in the derivatives of smooth activations, each beside its fixed twin.

One graph for all of them, elementwise over four samples: z = w ⊙ x, a = f(z),
loss = mean((a − y)²). The chain is dloss/dz = dloss/da · f′(z) and dloss/dw = dloss/dz · x,
so a wrong f′ shows in dloss/dz and dloss/dw while dloss/da stays right: the node gradients
point at the step that broke. No ReLU or abs here: kinks are a separate feature.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_check import case, node

EXPECTED = {
    "act_sigmoid_derivative": ("mismatch", "manual"),
    "act_sigmoid_derivative_fixed": ("ok", None),
    "act_tanh_derivative": ("mismatch", "manual"),
    "act_tanh_derivative_fixed": ("ok", None),
    "act_softplus_derivative": ("mismatch", "manual"),
    "act_softplus_derivative_fixed": ("ok", None),
    "act_exp_power_rule": ("mismatch", "manual"),
    "act_exp_power_rule_fixed": ("ok", None),
    "act_log_space_gradient": ("mismatch", "manual"),
    "act_log_space_gradient_fixed": ("ok", None),
}

POINT = {
    "params": {"w": [0.5, -1.0, 1.5, 2.0]},
    "data": {"x": [1.0, 2.0, -0.5, 0.25], "y": [0.5, 0.0, 1.0, 0.75]},
}


def activated_mse(f: Callable[[Tensor], Tensor], w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """z = w ⊙ x, a = f(z), loss = mean((a − y)²)."""
    z = node("z", w * x)
    a = node("a", f(z))
    return ((a - y) ** 2).mean()


def chain(da_dz: Tensor, a: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The rest of the backward pass, given the activation's local gradient f′(z)."""
    dloss_da = 2 * (a - y) / y.numel()
    dloss_dz = dloss_da * da_dz
    dloss_dw = dloss_dz * x
    return {"w": dloss_dw, "z": dloss_dz, "a": dloss_da}


# --- sigmoid: σ′ = σ(1 − σ), not σ ----------------------------------------------------------------


@case(**POINT)
def act_sigmoid_derivative(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(torch.sigmoid, w, x, y)


@act_sigmoid_derivative.manual
def act_sigmoid_derivative_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    a = torch.sigmoid(w * x)
    da_dz = a  # BUG: σ′(z) = σ(z)(1 − σ(z))
    return chain(da_dz, a, x, y)


@case(**POINT)
def act_sigmoid_derivative_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(torch.sigmoid, w, x, y)


@act_sigmoid_derivative_fixed.manual
def act_sigmoid_derivative_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    a = torch.sigmoid(w * x)
    da_dz = a * (1 - a)
    return chain(da_dz, a, x, y)


# --- tanh: tanh′ = 1 − tanh², not 1 − tanh --------------------------------------------------------


@case(**POINT)
def act_tanh_derivative(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(torch.tanh, w, x, y)


@act_tanh_derivative.manual
def act_tanh_derivative_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    a = torch.tanh(w * x)
    da_dz = 1 - a  # BUG: tanh′(z) = 1 − tanh²(z)
    return chain(da_dz, a, x, y)


@case(**POINT)
def act_tanh_derivative_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(torch.tanh, w, x, y)


@act_tanh_derivative_fixed.manual
def act_tanh_derivative_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    a = torch.tanh(w * x)
    da_dz = 1 - a**2
    return chain(da_dz, a, x, y)


# --- softplus: d log(1 + eᶻ)/dz = eᶻ/(1 + eᶻ) = σ(z), not 1/(1 + eᶻ) = σ(−z) ----------------------


@case(**POINT)
def act_softplus_derivative(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(F.softplus, w, x, y)


@act_softplus_derivative.manual
def act_softplus_derivative_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    z = w * x
    a = F.softplus(z)
    da_dz = 1 / (1 + torch.exp(z))  # BUG: the numerator eᶻ got lost; this is σ(−z)
    return chain(da_dz, a, x, y)


@case(**POINT)
def act_softplus_derivative_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(F.softplus, w, x, y)


@act_softplus_derivative_fixed.manual
def act_softplus_derivative_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    z = w * x
    a = F.softplus(z)
    da_dz = torch.sigmoid(z)
    return chain(da_dz, a, x, y)


# --- exp: the power rule applied to eᶻ ------------------------------------------------------------


@case(**POINT)
def act_exp_power_rule(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(torch.exp, w, x, y)


@act_exp_power_rule.manual
def act_exp_power_rule_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    z = w * x
    a = torch.exp(z)
    da_dz = z * torch.exp(z - 1)  # BUG: d(eᶻ)/dz is eᶻ; eᶻ is not zⁿ
    return chain(da_dz, a, x, y)


@case(**POINT)
def act_exp_power_rule_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return activated_mse(torch.exp, w, x, y)


@act_exp_power_rule_fixed.manual
def act_exp_power_rule_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    z = w * x
    a = torch.exp(z)
    da_dz = a
    return chain(da_dz, a, x, y)


# --- log: the gradient with respect to log p returned for p ---------------------------------------
# A positive parameter p, loss = mean((log p − t)²). dloss/dp = dloss/d(log p) · 1/p; the bug
# stops one step short. `sample` keeps p positive at the random points (log needs p > 0).

LOG_POINT = {
    "params": {"p": [0.5, 1.0, 2.0, 4.0]},
    "data": {"t": [0.0, 1.0, -1.0, 0.5]},
    "sample": lambda g: {"p": 0.25 + 2 * torch.rand(4, generator=g, dtype=torch.float64)},
}


def log_mse(p: Tensor, t: Tensor) -> Tensor:
    """loss = mean((log p − t)²)."""
    log_p = node("log_p", torch.log(p))
    return ((log_p - t) ** 2).mean()


@case(**LOG_POINT)
def act_log_space_gradient(p: Tensor, t: Tensor) -> Tensor:
    return log_mse(p, t)


@act_log_space_gradient.manual
def act_log_space_gradient_manual(p: Tensor, t: Tensor) -> dict[str, Tensor]:
    dloss_dlogp = 2 * (torch.log(p) - t) / t.numel()
    dloss_dp = dloss_dlogp  # BUG: log p is not p; the chain needs · d(log p)/dp = 1/p
    return {"p": dloss_dp, "log_p": dloss_dlogp}


@case(**LOG_POINT)
def act_log_space_gradient_fixed(p: Tensor, t: Tensor) -> Tensor:
    return log_mse(p, t)


@act_log_space_gradient_fixed.manual
def act_log_space_gradient_fixed_manual(p: Tensor, t: Tensor) -> dict[str, Tensor]:
    dloss_dlogp = 2 * (torch.log(p) - t) / t.numel()
    dlogp_dp = 1 / p
    dloss_dp = dloss_dlogp * dlogp_dp
    return {"p": dloss_dp, "log_p": dloss_dlogp}
