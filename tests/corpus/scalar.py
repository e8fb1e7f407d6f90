"""Planted bugs in scalar derivations of the linear family, each beside its fixed twin.

Every buggy case differs from its `_fixed` twin in the line marked `# BUG`. The forward passes
are right, so autograd and finite differences agree and the manual gradient is the culprit.
The data are the seeds': exercise 4-1's x = 2, y = 4, w = 1; the backprop video's x = 1, y = 2,
w = 1; the gradient-descent tutorial's X = [1, 2, 3, 4], Y = 2·X, w = 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from backprop_check import case, node

EXPECTED = {
    "scalar_sign_flip": ("mismatch", "manual"),
    "scalar_sign_flip_fixed": ("ok", None),
    "scalar_square_missing_2": ("mismatch", "manual"),
    "scalar_square_missing_2_fixed": ("ok", None),
    "scalar_forgot_x": ("mismatch", "manual"),
    "scalar_forgot_x_fixed": ("ok", None),
    "scalar_mse_missing_mean": ("mismatch", "manual"),
    "scalar_mse_missing_mean_fixed": ("ok", None),
    "scalar_mse_mean_twice": ("mismatch", "manual"),
    "scalar_mse_mean_twice_fixed": ("ok", None),
    "scalar_mse_dot_mean_noop": ("mismatch", "manual"),
    "scalar_mse_dot_mean_noop_fixed": ("ok", None),
    "scalar_quadratic_x_for_x2": ("mismatch", "manual"),
    "scalar_quadratic_x_for_x2_fixed": ("ok", None),
}

# Cases whose bug can hide at one point per device and dtype: the harness must still catch it
# at the others.
MAY_PASS_ONCE = {
    "scalar_forgot_x": "at the given x = 1 the forgotten factor dŷ/dw = x is 1",
}

EXERCISE_4_1 = {"params": {"w": 1.0}, "data": {"x": 2.0, "y": 4.0}}
BACKPROP_VIDEO = {"params": {"w": 1.0}, "data": {"x": 1.0, "y": 2.0}}
TUTORIAL_DATA = {"params": {"w": 0.0}, "data": {"X": [1.0, 2.0, 3.0, 4.0], "Y": [2.0, 4.0, 6.0, 8.0]}}


def squared_error(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """ŷ = w·x, s = ŷ − y, loss = s² (mean over samples when x is a vector)."""
    y_hat = node("y_hat", w * x)
    s = node("s", y_hat - y)
    return (s**2).mean()


# --- sign flip: s = ŷ − y read as y − ŷ -----------------------------------------------------------


@case(**EXERCISE_4_1)
def scalar_sign_flip(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return squared_error(w, x, y)


@scalar_sign_flip.manual
def scalar_sign_flip_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    s = w * x - y
    dloss_ds = 2 * s
    ds_dyhat = -1.0  # BUG: d(ŷ − y)/dŷ is +1
    dyhat_dw = x
    dloss_dyhat = dloss_ds * ds_dyhat
    return {"w": dloss_dyhat * dyhat_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(**EXERCISE_4_1)
def scalar_sign_flip_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return squared_error(w, x, y)


@scalar_sign_flip_fixed.manual
def scalar_sign_flip_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    s = w * x - y
    dloss_ds = 2 * s
    ds_dyhat = 1.0
    dyhat_dw = x
    dloss_dyhat = dloss_ds * ds_dyhat
    return {"w": dloss_dyhat * dyhat_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


# --- missing factor 2 of a square: d(s²)/ds written as s ------------------------------------------


@case(**EXERCISE_4_1)
def scalar_square_missing_2(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return squared_error(w, x, y)


@scalar_square_missing_2.manual
def scalar_square_missing_2_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    s = w * x - y
    dloss_ds = s  # BUG: d(s²)/ds is 2s
    dloss_dyhat = dloss_ds * 1.0
    return {"w": dloss_dyhat * x, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(**EXERCISE_4_1)
def scalar_square_missing_2_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return squared_error(w, x, y)


@scalar_square_missing_2_fixed.manual
def scalar_square_missing_2_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    s = w * x - y
    dloss_ds = 2 * s
    dloss_dyhat = dloss_ds * 1.0
    return {"w": dloss_dyhat * x, "y_hat": dloss_dyhat, "s": dloss_ds}


# --- forgot the factor x: right at the video's x = 1, wrong everywhere else -----------------------


@case(**BACKPROP_VIDEO)
def scalar_forgot_x(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return squared_error(w, x, y)


@scalar_forgot_x.manual
def scalar_forgot_x_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    s = w * x - y
    dloss_ds = 2 * s
    dloss_dyhat = dloss_ds * 1.0
    dloss_dw = dloss_dyhat  # BUG: forgot dŷ/dw = x (which is 1 at the given point)
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(**BACKPROP_VIDEO)
def scalar_forgot_x_fixed(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return squared_error(w, x, y)


@scalar_forgot_x_fixed.manual
def scalar_forgot_x_fixed_manual(w: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    s = w * x - y
    dloss_ds = 2 * s
    dloss_dyhat = dloss_ds * 1.0
    dloss_dw = dloss_dyhat * x
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


# --- missing 1/N of a mean: the gradient of the sum, N times too large ----------------------------


@case(**TUTORIAL_DATA)
def scalar_mse_missing_mean(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return squared_error(w, X, Y)


@scalar_mse_missing_mean.manual
def scalar_mse_missing_mean_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    s = w * X - Y
    dloss_ds = 2 * s  # BUG: the loss is a mean, each sample's share is 2s/N
    dloss_dyhat = dloss_ds * 1.0
    return {"w": (dloss_dyhat * X).sum(), "y_hat": dloss_dyhat, "s": dloss_ds}


@case(**TUTORIAL_DATA)
def scalar_mse_missing_mean_fixed(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return squared_error(w, X, Y)


@scalar_mse_missing_mean_fixed.manual
def scalar_mse_missing_mean_fixed_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    s = w * X - Y
    dloss_ds = 2 * s / X.numel()
    dloss_dyhat = dloss_ds * 1.0
    return {"w": (dloss_dyhat * X).sum(), "y_hat": dloss_dyhat, "s": dloss_ds}


# --- the mean taken twice: an extra 1/N -----------------------------------------------------------


@case(**TUTORIAL_DATA)
def scalar_mse_mean_twice(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return squared_error(w, X, Y)


@scalar_mse_mean_twice.manual
def scalar_mse_mean_twice_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    s = w * X - Y
    dloss_ds = 2 * s / X.numel()
    dloss_dyhat = dloss_ds * 1.0
    dloss_dw = (dloss_dyhat * X).mean()  # BUG: 1/N is already in dloss_ds; the shares add up
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


@case(**TUTORIAL_DATA)
def scalar_mse_mean_twice_fixed(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return squared_error(w, X, Y)


@scalar_mse_mean_twice_fixed.manual
def scalar_mse_mean_twice_fixed_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    s = w * X - Y
    dloss_ds = 2 * s / X.numel()
    dloss_dyhat = dloss_ds * 1.0
    dloss_dw = (dloss_dyhat * X).sum()
    return {"w": dloss_dw, "y_hat": dloss_dyhat, "s": dloss_ds}


# --- ×N extra: the tutorial's dot product already sums, and .mean() of a scalar does nothing ------


@case(**TUTORIAL_DATA)
def scalar_mse_dot_mean_noop(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return squared_error(w, X, Y)


@scalar_mse_dot_mean_noop.manual
def scalar_mse_dot_mean_noop_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    y_hat = w * X
    return {"w": torch.dot(2 * X, y_hat - Y).mean()}  # BUG: the mean of one number is itself


@case(**TUTORIAL_DATA)
def scalar_mse_dot_mean_noop_fixed(w: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    return squared_error(w, X, Y)


@scalar_mse_dot_mean_noop_fixed.manual
def scalar_mse_dot_mean_noop_fixed_manual(w: Tensor, X: Tensor, Y: Tensor) -> dict[str, Tensor]:
    y_hat = w * X
    return {"w": torch.dot(2 * X, y_hat - Y) / X.numel()}


# --- x for x²: exercise 4-3's dŷ/dw1 written as x -------------------------------------------------


QUADRATIC = {"params": {"w1": 1.0, "w2": 1.0, "b": 1.0}, "data": {"x": 2.0, "y": 4.0}}


def quadratic_error(w1: Tensor, w2: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """ŷ = w1·x² + w2·x + b, loss = (ŷ − y)²."""
    y_hat = node("y_hat", w1 * x**2 + w2 * x + b)
    return (y_hat - y) ** 2


@case(**QUADRATIC)
def scalar_quadratic_x_for_x2(w1: Tensor, w2: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return quadratic_error(w1, w2, b, x, y)


@scalar_quadratic_x_for_x2.manual
def scalar_quadratic_x_for_x2_manual(
    w1: Tensor, w2: Tensor, b: Tensor, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    dloss_dyhat = 2 * (w1 * x**2 + w2 * x + b - y)
    dyhat_dw1 = x  # BUG: ŷ = w1·x², so dŷ/dw1 = x²
    dyhat_dw2 = x
    return {
        "w1": dloss_dyhat * dyhat_dw1,
        "w2": dloss_dyhat * dyhat_dw2,
        "b": dloss_dyhat,
        "y_hat": dloss_dyhat,
    }


@case(**QUADRATIC)
def scalar_quadratic_x_for_x2_fixed(w1: Tensor, w2: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return quadratic_error(w1, w2, b, x, y)


@scalar_quadratic_x_for_x2_fixed.manual
def scalar_quadratic_x_for_x2_fixed_manual(
    w1: Tensor, w2: Tensor, b: Tensor, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    dloss_dyhat = 2 * (w1 * x**2 + w2 * x + b - y)
    dyhat_dw1 = x**2
    dyhat_dw2 = x
    return {
        "w1": dloss_dyhat * dyhat_dw1,
        "w2": dloss_dyhat * dyhat_dw2,
        "b": dloss_dyhat,
        "y_hat": dloss_dyhat,
    }
