"""Small correct models with independently derived gradients, shared by the tests.

Each entry: name → (params, data, forward, gradient), where `gradient(**values)` is written by
hand (never by calling autograd), so a harness bug cannot hide behind a shared code path.
"""
from __future__ import annotations

import torch


def _randn(*shape: int):
    return lambda g: torch.randn(*shape, generator=g, dtype=torch.float64)


def linear(w, x, y):
    return (w * x - y) ** 2


def linear_grad(w, x, y):
    return {"w": 2 * (w * x - y) * x}


def mse(w, b, X, Y):
    return ((X @ w + b - Y) ** 2).mean()


def mse_grad(w, b, X, Y):
    r = X @ w + b - Y
    return {"w": 2 * X.T @ r / r.numel(), "b": 2 * r.mean()}


def tanh_net(W1, b1, W2, X, Y):
    h = torch.tanh(X @ W1 + b1)
    return ((h @ W2 - Y) ** 2).sum()


def tanh_net_grad(W1, b1, W2, X, Y):
    h = torch.tanh(X @ W1 + b1)
    r = h @ W2 - Y
    dW2 = h.T @ (2 * r)
    dz = (2 * r) @ W2.T * (1 - h * h)
    return {"W1": X.T @ dz, "b1": dz.sum(0), "W2": dW2}


def softmax_ce(W, X, labels):
    logits = X @ W
    return torch.nn.functional.cross_entropy(logits, labels)


def softmax_ce_grad(W, X, labels):
    logits = X @ W
    p = torch.softmax(logits, dim=1)
    onehot = torch.zeros_like(p)
    onehot[torch.arange(len(labels)), labels] = 1
    return {"W": X.T @ (p - onehot) / len(labels)}


def exp_log(a, x):
    return (torch.exp(a * x) + torch.log(1 + a * a) * x).sum()


def exp_log_grad(a, x):
    return {"a": (x * torch.exp(a * x) + 2 * a / (1 + a * a) * x).sum()}


MODELS = {
    "linear": ({"w": 1.0}, {"x": 1.0, "y": 2.0}, linear, linear_grad),
    "mse": ({"w": _randn(3), "b": 0.5}, {"X": _randn(6, 3), "Y": _randn(6)}, mse, mse_grad),
    "tanh-net": (
        {"W1": _randn(4, 5), "b1": _randn(5), "W2": _randn(5, 2)},
        {"X": _randn(3, 4), "Y": _randn(3, 2)},
        tanh_net,
        tanh_net_grad,
    ),
    "softmax-cross-entropy": (
        {"W": _randn(4, 3)},
        {"X": _randn(5, 4), "labels": [0, 2, 1, 1, 0]},
        softmax_ce,
        softmax_ce_grad,
    ),
    "exp-log": ({"a": 0.3}, {"x": _randn(4)}, exp_log, exp_log_grad),
}
