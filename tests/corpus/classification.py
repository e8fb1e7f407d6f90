"""Planted bugs in classification losses with integer labels, each beside its fixed twin.

A linear classifier over N = 5 samples of D = 4 features: logits Z = X·Wᵀ + b (N×C), then
softmax cross-entropy over C = 3 classes, averaged over the samples. Its famous gradient is

    dloss/dZ = (softmax(Z) − onehot(labels)) / N

The labels are integer data: they stay integer in float32 and float64 runs, and `sample`
draws valid ones (0 ≤ label < C) at the random points. The binary case is logistic regression,
dloss/dz = (σ(z) − y) / N, with 0/1 labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from backprop_check import case, node

EXPECTED = {
    "cls_softmax_one_based_labels": ("mismatch", "manual"),
    "cls_softmax_one_based_labels_fixed": ("ok", None),
    "cls_softmax_forgot_onehot": ("mismatch", "manual"),
    "cls_softmax_forgot_onehot_fixed": ("ok", None),
    "cls_logistic_sign": ("mismatch", "manual"),
    "cls_logistic_sign_fixed": ("ok", None),
}

N, D, C = 5, 4, 3


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


SOFTMAX = {
    "params": {"W": randn(C, D, seed=11), "b": randn(C, seed=12)},
    "data": {"X": randn(N, D, seed=13), "labels": [0, 2, 1, 2, 0]},
    "sample": lambda g: {"labels": torch.randint(0, C, (N,), generator=g)},
}


def softmax_cross_entropy(W: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    """Z = X·Wᵀ + b, loss = mean cross-entropy of softmax(Z) against the labels."""
    Z = node("z", X @ W.T + b)
    return F.cross_entropy(Z, labels)


def softmax_chain(dloss_dZ: Tensor, X: Tensor) -> dict[str, Tensor]:
    """From dloss/dZ back to the parameters."""
    return {"W": dloss_dZ.T @ X, "b": dloss_dZ.sum(dim=0), "z": dloss_dZ}


# --- the wrong class: labels one-hot encoded as if they counted from 1 ----------------------------


@case(**SOFTMAX)
def cls_softmax_one_based_labels(W: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    return softmax_cross_entropy(W, b, X, labels)


@cls_softmax_one_based_labels.manual
def cls_softmax_one_based_labels_manual(W: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> dict[str, Tensor]:
    Z = X @ W.T + b
    probs = torch.softmax(Z, dim=1)
    onehot = torch.eye(C, dtype=Z.dtype, device=Z.device)[labels - 1]  # BUG: labels count from 0
    return softmax_chain((probs - onehot) / N, X)


@case(**SOFTMAX)
def cls_softmax_one_based_labels_fixed(W: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    return softmax_cross_entropy(W, b, X, labels)


@cls_softmax_one_based_labels_fixed.manual
def cls_softmax_one_based_labels_fixed_manual(
    W: Tensor, b: Tensor, X: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    Z = X @ W.T + b
    probs = torch.softmax(Z, dim=1)
    onehot = torch.eye(C, dtype=Z.dtype, device=Z.device)[labels]
    return softmax_chain((probs - onehot) / N, X)


# --- forgot to subtract the one-hot target: softmax alone -----------------------------------------


@case(**SOFTMAX)
def cls_softmax_forgot_onehot(W: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    return softmax_cross_entropy(W, b, X, labels)


@cls_softmax_forgot_onehot.manual
def cls_softmax_forgot_onehot_manual(W: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> dict[str, Tensor]:
    Z = X @ W.T + b
    probs = torch.softmax(Z, dim=1)
    return softmax_chain(probs / N, X)  # BUG: −onehot(labels) is missing: the label never enters


@case(**SOFTMAX)
def cls_softmax_forgot_onehot_fixed(W: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    return softmax_cross_entropy(W, b, X, labels)


@cls_softmax_forgot_onehot_fixed.manual
def cls_softmax_forgot_onehot_fixed_manual(
    W: Tensor, b: Tensor, X: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    Z = X @ W.T + b
    probs = torch.softmax(Z, dim=1)
    onehot = F.one_hot(labels, C).to(Z.dtype)
    return softmax_chain((probs - onehot) / N, X)


# --- logistic regression: y − σ(z) is the direction to step in, not the gradient ------------------

LOGISTIC = {
    "params": {"w": randn(D, seed=14), "b": 0.0},
    "data": {"X": randn(N, D, seed=15), "labels": [1, 0, 0, 1, 1]},
    "sample": lambda g: {"labels": torch.randint(0, 2, (N,), generator=g)},
}


def logistic(w: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    """z = X·w + b, loss = mean binary cross-entropy of σ(z) against 0/1 labels."""
    z = node("z", X @ w + b)
    return F.binary_cross_entropy_with_logits(z, labels.to(z.dtype))


@case(**LOGISTIC)
def cls_logistic_sign(w: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    return logistic(w, b, X, labels)


@cls_logistic_sign.manual
def cls_logistic_sign_manual(w: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> dict[str, Tensor]:
    z = X @ w + b
    y = labels.to(z.dtype)
    dloss_dz = (y - torch.sigmoid(z)) / N  # BUG: the gradient is (σ(z) − y)/N
    return {"w": X.T @ dloss_dz, "b": dloss_dz.sum(), "z": dloss_dz}


@case(**LOGISTIC)
def cls_logistic_sign_fixed(w: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    return logistic(w, b, X, labels)


@cls_logistic_sign_fixed.manual
def cls_logistic_sign_fixed_manual(w: Tensor, b: Tensor, X: Tensor, labels: Tensor) -> dict[str, Tensor]:
    z = X @ w + b
    y = labels.to(z.dtype)
    dloss_dz = (torch.sigmoid(z) - y) / N
    return {"w": X.T @ dloss_dz, "b": dloss_dz.sum(), "z": dloss_dz}
