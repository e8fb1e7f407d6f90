"""Tensor-, sequence- and data-parallel layers, checked on 2 ranks of torch.distributed (gloo, CPU).

Each layer is written as Megatron-LM writes it: the collectives are autograd Functions whose
backward is the collective's adjoint (an all-reduce's is the identity, an identity's is an
all-reduce, an all-gather's is a reduce-scatter). The harness runs every function on its ranks,
each with its shards of the global inputs, and checks the ranks' backward against finite
differences of the global function.

The correct layers are `ok`. Each `slip_*` case is one of the slips that training runs meet, and
must be a mismatch with culprit `autograd` that names the rank:

    backprop-check run examples/tensor_parallel.py
    torchrun --standalone --nproc_per_node=2 -m backprop_check run examples/tensor_parallel.py
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from backprop_check import function_case

WORLD = 2


def _rank() -> int:
    return dist.get_rank()


def _world() -> int:
    return dist.get_world_size()


# --- the collectives, with their adjoints ------------------------------------------------------


class CopyToRanks(torch.autograd.Function):
    """Megatron's f: identity forward; the backward sums the ranks' gradients (all-reduce)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SumOverRanks(torch.autograd.Function):
    """Megatron's g: all-reduce forward; the backward is the identity (every rank holds v)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; the backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(_world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(_world(), dim=-1)[_rank()].contiguous()


class GatherSequence(torch.autograd.Function):
    """Sequence parallelism: all-gather the tokens; the backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(_world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad.chunk(_world(), dim=0)[_rank()].contiguous()


class ScatterSequence(torch.autograd.Function):
    """Sequence parallelism: reduce-scatter the tokens; the backward all-gathers."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x.chunk(_world(), dim=0)[_rank()].contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(_world())]
        dist.all_gather(parts, grad.contiguous())
        return torch.cat(parts, dim=0)


# --- the layers ---------------------------------------------------------------------------------

x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
w1 = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
w2 = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
MLP = dict(
    inputs=(x, w1, w2),
    world_size=WORLD,
    placements=(Replicate(), Shard(1), Shard(0)),  # x whole, w1 by columns, w2 by rows
    out_placements=(Replicate(),),
)


def mlp(x, w1, w2):
    """The single-process function the parallel MLP computes."""
    return torch.tanh(x @ w1) @ w2


@function_case(**MLP)
def tp_mlp(x, w1, w2):
    """Column-parallel then row-parallel linear layer: one all-reduce each way."""
    return SumOverRanks.apply(torch.tanh(CopyToRanks.apply(x) @ w1) @ w2)


COLUMN = dict(
    inputs=(x, w1), world_size=WORLD, placements=(Replicate(), Shard(1)), out_placements=(Replicate(),)
)


@function_case(**COLUMN)
def column_parallel(x, w):
    """A column-parallel linear layer whose output is all-gathered."""
    return GatherLastDim.apply(CopyToRanks.apply(x) @ w)


tokens = torch.randn(4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
gamma = 1 + 0.1 * torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
beta = 0.1 * torch.randn(4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
up = torch.randn(4, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
down = torch.randn(8, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
BLOCK = dict(
    inputs=(tokens, gamma, beta, up, down),
    world_size=WORLD,
    # tokens split along the sequence; the LayerNorm's weights on every rank; the MLP by columns, rows
    placements=(Shard(0), Replicate(), Replicate(), Shard(1), Shard(0)),
    out_placements=(Shard(0),),
)


def _block(tokens, gamma, beta, up, down, reduce_norm=True):
    if reduce_norm:  # every rank's tokens reach the LayerNorm's weights: sum their gradients
        gamma, beta = CopyToRanks.apply(gamma), CopyToRanks.apply(beta)
    normed = torch.nn.functional.layer_norm(tokens, (tokens.shape[-1],), gamma, beta)
    hidden = torch.tanh(GatherSequence.apply(normed) @ up)
    return ScatterSequence.apply(hidden @ down)


@function_case(**BLOCK)
def sequence_parallel_block(tokens, gamma, beta, up, down):
    """Sequence-parallel LayerNorm → tensor-parallel MLP (Megatron-LM's sequence parallelism)."""
    return _block(tokens, gamma, beta, up, down)


batch = torch.randn(4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)


@function_case(
    inputs=(batch, weight), world_size=WORLD, placements=(Shard(0), Replicate()), out_placements=(Shard(0),)
)
def data_parallel_linear(x, w):
    """Data parallelism: each rank its slice of the batch, the weight's gradient summed over the
    ranks (what DDP's all-reduce does)."""
    return torch.tanh(x @ CopyToRanks.apply(w))


# --- the slips ----------------------------------------------------------------------------------


class IdentityBoth(torch.autograd.Function):
    """f without its all-reduce: each rank keeps only its own part of x's gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


class SumOverRanksTwice(torch.autograd.Function):
    """g whose backward all-reduces again: v, already on every rank, is summed world-size times."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AverageToRanks(torch.autograd.Function):
    """f whose backward averages (all-reduce ÷ world size) where the ranks' parts must be summed."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / _world()


class GatherLastDimWrongRank(torch.autograd.Function):
    """An all-gather whose backward keeps the mirror rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(_world())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(_world(), dim=-1)[_world() - 1 - _rank()].contiguous()


class CopyToRanksLastRankSilent(torch.autograd.Function):
    """f whose last rank feeds zeros to the all-reduce (a masked or early-returned rank): every
    rank ends with the same gradient, so the replicas agree, but the last rank's part is missing."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = torch.zeros_like(grad) if _rank() == _world() - 1 else grad.clone()
        dist.all_reduce(grad)
        return grad


class SumOverRanksOnes(torch.autograd.Function):
    """g whose backward returns ones: right under `.sum()` (v = 1), wrong for any other v."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return torch.ones_like(grad)


@function_case(**MLP)
def slip_missing_all_reduce(x, w1, w2):
    return SumOverRanks.apply(torch.tanh(IdentityBoth.apply(x) @ w1) @ w2)


@function_case(**MLP)
def slip_doubled_all_reduce(x, w1, w2):
    return SumOverRanksTwice.apply(torch.tanh(CopyToRanks.apply(x) @ w1) @ w2)


@function_case(**MLP)
def slip_average_for_sum(x, w1, w2):
    return SumOverRanks.apply(torch.tanh(AverageToRanks.apply(x) @ w1) @ w2)


@function_case(**MLP)
def slip_last_rank_feeds_zeros(x, w1, w2):
    return SumOverRanks.apply(torch.tanh(CopyToRanksLastRankSilent.apply(x) @ w1) @ w2)


@function_case(**COLUMN)
def slip_gather_rank_order(x, w):
    return GatherLastDimWrongRank.apply(CopyToRanks.apply(x) @ w)


@function_case(**MLP)
def slip_right_only_under_sum(x, w1, w2):
    return SumOverRanksOnes.apply(torch.tanh(CopyToRanks.apply(x) @ w1) @ w2)


@function_case(**BLOCK)
def slip_norm_weight_not_reduced(tokens, gamma, beta, up, down):
    return _block(tokens, gamma, beta, up, down, reduce_norm=False)
