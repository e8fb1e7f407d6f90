"""Two layers of a course assignment, each a numpy forward pass with its backward pass below.

A layer's forward returns its output and a cache of what the backward pass will need; its
backward receives the upstream gradient dout = dloss/dout and the cache, and returns the
gradient of every input, in input order. Each local gradient gets its own line:

    affine:     out = x·w + b
                dx = dout·wᵀ      dw = xᵀ·dout      db = Σₙ dout

    batchnorm:  mu = mean(x)      xc = x − mu       var = mean(xc²)
                std = √(var + ε)  x_hat = xc / std  out = gamma·x_hat + beta
                and back through the same six steps, last one first.

`layer(forward, backward, inputs)` turns a pair into a case: the harness draws a random dout
(again at every random point), takes loss = Σ dout·out, and checks backward's gradients against
finite differences of forward, element by element, with an error bar.

Run `backprop-check run examples/layers.py`; in a notebook,
`backprop_check.check_layer(affine_forward, affine_backward, (x, w, b))` does the same.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from backprop_check import layer

Cache = tuple[np.ndarray, ...]


def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Cache]:
    """out = x·w + b for N samples x (N, D), weights w (D, M) and a bias b (M,)."""
    out = x.reshape(x.shape[0], -1) @ w + b
    cache = (x, w)
    return out, cache


def affine_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, w = cache
    dx = (dout @ w.T).reshape(x.shape)  # dout/dx = wᵀ: (N, M)·(M, D)
    dw = x.reshape(x.shape[0], -1).T @ dout  # dout/dw = xᵀ: (D, N)·(N, M), the N samples summed
    db = dout.sum(axis=0)  # dout/db = 1 for each sample: w and b are shared by the batch
    return dx, dw, db


def batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict[str, Any]
) -> tuple[np.ndarray, Cache]:
    """Training-mode batch normalization of x (N, D), one mean and variance per feature."""
    eps = bn_param.get("eps", 1e-5)
    mu = x.mean(axis=0)  # step 1: the batch mean
    xc = x - mu  # step 2: centred
    var = (xc**2).mean(axis=0)  # step 3: the batch variance
    std = np.sqrt(var + eps)  # step 4
    x_hat = xc / std  # step 5: normalized
    out = gamma * x_hat + beta  # step 6: scaled and shifted
    cache = (xc, std, x_hat, gamma)
    return out, cache


def batchnorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xc, std, x_hat, gamma = cache
    N = dout.shape[0]
    dbeta = dout.sum(axis=0)  # step 6, out = gamma·x_hat + beta: dout/dbeta = 1
    dgamma = (dout * x_hat).sum(axis=0)  # dout/dgamma = x_hat
    dx_hat = dout * gamma  # dout/dx_hat = gamma
    dxc = dx_hat / std  # step 5, x_hat = xc / std: dx_hat/dxc = 1/std
    dstd = -(dx_hat * xc).sum(axis=0) / std**2  # dx_hat/dstd = −xc/std², summed over the batch
    dvar = dstd / (2 * std)  # step 4, std = √(var + ε): dstd/dvar = 1/(2·std)
    dxc = dxc + 2 * xc * dvar / N  # step 3, var = mean(xc²): dvar/dxc = 2·xc/N (xc's second path)
    dmu = -dxc.sum(axis=0)  # step 2, xc = x − mu: dxc/dmu = −1, summed over the batch
    dx = dxc + dmu / N  # dxc/dx = 1, and step 1, mu = mean(x): dmu/dx = 1/N
    return dx, dgamma, dbeta


rng = np.random.default_rng(0)

affine = layer(
    affine_forward,
    affine_backward,
    (rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)),
)

batchnorm = layer(
    batchnorm_forward,
    batchnorm_backward,
    (rng.standard_normal((6, 4)), rng.standard_normal(4), rng.standard_normal(4), {"mode": "train", "eps": 1e-5}),
)
