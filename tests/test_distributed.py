"""Distributed checks: real gloo ranks on the CPU (2 and 4), the layers of
examples/tensor_parallel.py correct and slipped, and the faults that must be one error line."""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Partial, Replicate, Shard

import backprop_check as bc
from backprop_check.commands.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tensor_parallel.py"
QUICK = dict(dtypes=["float64"], points=0)  # the given point, float64: each check is a few forward batches


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("_tensor_parallel_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TP = _example()


def x64(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def no_ranks_left() -> bool:
    return not multiprocessing.active_children()


@pytest.fixture(scope="module")
def example_results() -> dict[str, bc.Result]:
    """Every case of examples/tensor_parallel.py on 2 ranks, run once for the tests below."""
    report = bc.run(str(EXAMPLE), devices=["cpu"], **QUICK)
    assert no_ranks_left()
    return {r.case: r for r in report.results}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("tp_mlp", id="tensor-parallel-mlp"),
        pytest.param("column_parallel", id="column-parallel-layer-with-an-all-gathered-output"),
        pytest.param("sequence_parallel_block", id="sequence-parallel-layernorm-then-mlp"),
        pytest.param("data_parallel_linear", id="data-parallel-linear-layer"),
    ],
)
def test_a_correct_parallel_layer_is_ok_on_two_ranks(example_results: dict[str, bc.Result], name: str) -> None:
    result = example_results[name]
    assert (result.verdict, result.culprit) == ("ok", None), result.message


@pytest.mark.parametrize(
    "name, rank, slip",
    [
        pytest.param("slip_missing_all_reduce", "x on rank 0", "an all-reduce is missing", id="missing-all-reduce"),
        pytest.param("slip_doubled_all_reduce", "on rank 0", "2× the true one", id="doubled-all-reduce"),
        pytest.param("slip_average_for_sum", "x on rank 0", "an average over ranks", id="average-where-a-sum-belongs"),
        pytest.param("slip_last_rank_feeds_zeros", "x on rank 1", "without rank 1's part", id="one-rank-feeds-zeros"),
        pytest.param("slip_gather_rank_order", "w on rank 0", "rank 0 holds rank 1's chunk", id="all-gather-backward-rank-order"),
        pytest.param("slip_right_only_under_sum", "on rank 0", "right under a .sum() loss", id="right-only-under-sum"),
        pytest.param("slip_norm_weight_not_reduced", "gamma on rank 0", "an all-reduce is missing", id="layernorm-weight-never-reduced"),
    ],
)
def test_a_slipped_backward_is_a_mismatch_of_autograd_naming_the_rank_and_the_slip(
    example_results: dict[str, bc.Result], name: str, rank: str, slip: str
) -> None:
    result = example_results[name]
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert rank in result.message and slip in result.message, result.message
    assert "of the global gradient" in result.message and "_OnRanks" not in " ".join(result.hints)
    # the rank's slip says the factor; no calculus hint says it again (d(s²)/ds for an all-reduce done twice)
    assert not any("the true gradient" in hint for hint in result.hints), result.hints


def test_a_replicated_gradient_that_is_only_this_ranks_part_says_which_replicas_disagree(
    example_results: dict[str, bc.Result],
) -> None:
    checks = {c.name: c for c in example_results["slip_norm_weight_not_reduced"].checks}
    assert checks["gamma on rank 1"].verdict == "mismatch"
    assert "the replicas disagree" in (checks["gamma on rank 1"].note or "")


def test_a_sharded_gradient_names_the_element_of_the_ranks_shard() -> None:
    def scale(x: torch.Tensor) -> torch.Tensor:  # rank 1 doubles the gradient of its shard
        return Doubled.apply(x) * 3 if dist.get_rank() == 1 else x * 3

    report = bc.check(scale, (x64(4, 3),), world_size=2, placements=(Shard(0),), out_placements=(Shard(0),), **QUICK)
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "x on rank 1" in result.message and "of its shard (Shard(0))" in result.message
    assert "element [2, 0] of the global gradient" in result.message and "element [0, 0] of its shard" in result.message
    assert "rank 1's chunk of the gradient is 2× the true one" in result.message


class Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


def test_four_ranks_check_the_tensor_parallel_mlp_and_find_its_missing_all_reduce() -> None:
    x, w1, w2 = x64(3, 4, seed=1), x64(4, 8, seed=2), x64(8, 5, seed=3)
    options = dict(world_size=4, placements=(Replicate(), Shard(1), Shard(0)), out_placements=(Replicate(),), **QUICK)
    good = bc.check(TP.tp_mlp.fn, (x, w1, w2), **options)
    bad = bc.check(TP.slip_missing_all_reduce.fn, (x, w1, w2), **options)
    assert [r.verdict for r in good.results] == ["ok"], good.results[0].message
    (result,) = bad.results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "x on rank 0" in result.message and "an all-reduce is missing" in result.message
    assert no_ranks_left()


class LastRankSilent(torch.autograd.Function):
    """Megatron's f whose backward on the last rank feeds zeros to the all-reduce."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(grad) if dist.get_rank() == dist.get_world_size() - 1 else grad.clone()
        dist.all_reduce(grad)
        return grad


def _mlp_last_rank_silent(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return TP.SumOverRanks.apply(torch.tanh(LastRankSilent.apply(x) @ w1) @ w2)


def test_four_ranks_name_the_one_rank_whose_part_the_all_reduce_misses() -> None:
    """Every replica holds the same wrong gradient (the reduction ran, rank 3 fed it zeros): the
    ranks' parts, each estimated by moving one rank's replica alone, name rank 3."""
    x, w1, w2 = x64(3, 4, seed=1), x64(4, 8, seed=2), x64(8, 5, seed=3)
    report = bc.check(
        _mlp_last_rank_silent, (x, w1, w2), world_size=4, placements=(Replicate(), Shard(1), Shard(0)),
        out_placements=(Replicate(),), **QUICK,
    )
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "x on rank 3" in result.message and "without rank 3's part" in result.message, result.message
    assert "the replicas disagree" not in result.message
    assert no_ranks_left()


class _ThreeOnRank1(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * 3.0 if dist.get_rank() == 1 else g


def test_a_rank_that_scales_its_own_shard_is_named_with_the_factor() -> None:
    report = bc.check(
        lambda x, w: torch.tanh(TP.CopyToRanks.apply(x) @ _ThreeOnRank1.apply(w)), (x64(3, 4, seed=7), x64(4, 6, seed=8)),
        world_size=2, placements=(Replicate(), Shard(1)), out_placements=(Shard(1),), **QUICK,
    )
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "w on rank 1" in result.message and "rank 1's chunk of the gradient is 3× the true one" in result.message, result.message


def test_four_ranks_check_the_sequence_parallel_block() -> None:
    inputs = (x64(8, 4, seed=4), 1 + 0.1 * x64(4, seed=5), 0.1 * x64(4, seed=6), x64(4, 8, seed=7), x64(8, 4, seed=8))
    report = bc.check(
        TP.sequence_parallel_block.fn, inputs, world_size=4,
        placements=(Shard(0), Replicate(), Replicate(), Shard(1), Shard(0)), out_placements=(Shard(0),), **QUICK,
    )
    assert [r.verdict for r in report.results] == ["ok"], report.results[0].message


def test_a_partial_gradient_declared_partial_is_checked_as_the_sum_over_ranks() -> None:
    report = bc.check(
        TP.slip_missing_all_reduce.fn, (x64(3, 4, seed=1), x64(4, 6, seed=2), x64(6, 5, seed=3)), world_size=2,
        placements=(Replicate(), Shard(1), Shard(0)), out_placements=(Replicate(),),
        grad_placements=(Partial(), Shard(1), Shard(0)), **QUICK,
    )
    assert [r.verdict for r in report.results] == ["ok"], report.results[0].message


def test_float32_ranks_are_judged_fairly() -> None:
    report = bc.check(
        TP.tp_mlp.fn, (x64(3, 4, seed=1), x64(4, 6, seed=2), x64(6, 5, seed=3)), world_size=2,
        placements=(Replicate(), Shard(1), Shard(0)), out_placements=(Replicate(),), dtypes=["float32"], points=1,
    )
    assert [r.verdict for r in report.results] == ["ok"], report.results[0].message


# --- faults: one error line each, never a hang, nothing left running -----------------------------


def _raises_on_rank_1(x: torch.Tensor) -> torch.Tensor:
    if dist.get_rank() == 1:
        raise ValueError("this shard is bad")
    return x * 2


def _skips_a_collective(x: torch.Tensor) -> torch.Tensor:
    if dist.get_rank() == 0:
        y = x.clone()
        dist.all_reduce(y)
        return y
    return x * 2


def _doubles(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@pytest.mark.parametrize(
    "fn, options, expected",
    [
        pytest.param(_raises_on_rank_1, {}, "rank 1: _raises_on_rank_1 raised ValueError: this shard is bad (line", id="a-rank-raises"),
        pytest.param(_skips_a_collective, {"timeout": 4}, "rank 0 still waiting while rank 1 had finished", id="a-rank-skips-a-collective"),
        pytest.param(_doubles, {"world_size": 3}, "which placements Shard(0) cannot split evenly over 3 ranks", id="placements-do-not-divide"),
        pytest.param(_doubles, {"backend": "nccl"}, "world_size=2 needs 2 CUDA devices", id="more-ranks-than-devices"),
        pytest.param(_doubles, {"placements": (Shard(0), Shard(1))}, "placements has 2 entries for 1 inputs", id="a-placement-too-many"),
        pytest.param(_doubles, {"placements": (Partial(),)}, "inputs are Shard(d) or Replicate()", id="a-partial-input"),
        pytest.param(_doubles, {"out_placements": (Shard(0), Shard(0))}, "returns 1 output, but out_placements has 2", id="out-placements-do-not-match"),
    ],
)
def test_a_fault_is_one_error_line_and_leaves_nothing_running(fn: Any, options: dict[str, Any], expected: str) -> None:
    given = dict(world_size=2, placements=(Shard(0),), out_placements=(Shard(0),))
    given.update(options)
    started = time.monotonic()
    report = bc.check(fn, (x64(4, 4),), **given, **QUICK)
    (result,) = report.results
    assert result.verdict == "error" and expected in result.message, result.message
    assert "\n" not in result.message
    assert time.monotonic() - started < 30
    assert no_ranks_left()


def test_a_port_already_in_use_does_not_stop_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        report = bc.check(_doubles, (x64(4, 4),), world_size=2, placements=(Shard(0),), out_placements=(Shard(0),), **QUICK)
    assert [r.verdict for r in report.results] == ["ok"]


def test_distributed_keywords_without_world_size_are_refused() -> None:
    with pytest.raises(TypeError, match="placements= is for a distributed check: give world_size= too"):
        bc.check(_doubles, (x64(4),), placements=(Shard(0),))


def test_the_cli_runs_a_case_file_of_distributed_checks(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["run", str(EXAMPLE), "-k", "column_parallel or slip_gather", "--dtype", "float64", "--points", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 1
    assert "column_parallel" in out and "slip_gather_rank_order" in out and "rank 0 holds rank 1's chunk" in out
    assert no_ranks_left()


@pytest.mark.skipif(os.environ.get("BACKPROP_CHECK_SKIP_TORCHRUN") == "1", reason="torchrun disabled here")
def test_the_same_case_file_passes_alone_and_under_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    cases = tmp_path / "tp.py"
    cases.write_text(
        "import torch, torch.distributed as dist\n"
        "from torch.distributed.tensor import Replicate, Shard\n"
        "from backprop_check import function_case\n"
        "class Reduce(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        x = x.clone(); dist.all_reduce(x); return x\n"
        "    @staticmethod\n"
        "    def backward(ctx, g): return g\n"
        "@function_case(inputs=(torch.ones(2, 4, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64).reshape(4, 2)),\n"
        "               world_size=2, placements=(Shard(1), Shard(0)), out_placements=(Replicate(),))\n"
        "def row_parallel(x, w):\n"
        "    return Reduce.apply(torch.sin(x) @ w)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    command = ["-m", "backprop_check", "run", str(cases), "--dtype", "float64", "--points", "0", "--device", "cpu"]
    assert main(command[2:]) == 0, capsys.readouterr().out  # `backprop-check run FILE`, in-process
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert launched.stdout.count("row_parallel") == 1 and "1 ok" in launched.stdout  # rank 0 alone reports


# --- reference=: a single-process function of the global inputs -----------------------------------


class _DoubledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


def _wrong_backward_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.tanh(_DoubledBackward.apply(x) @ w1) @ w2


def _other_function(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.sin(x @ w1) @ w2


@pytest.mark.parametrize(
    "reference, verdict, culprit, expected",
    [
        pytest.param(TP.mlp, "ok", None, "all agree", id="the-reference-agrees"),
        pytest.param(_wrong_backward_reference, "mismatch", "reference", "x vs reference", id="a-wrong-reference-backward"),
        pytest.param(_other_function, "mismatch", None, "does not compute the reference's", id="another-function"),
    ],
)
def test_a_reference_is_a_fourth_opinion_on_the_global_function(
    reference: Any, verdict: str, culprit: str | None, expected: str
) -> None:
    options = dict(TP.MLP)
    inputs = options.pop("inputs")
    (result,) = bc.check(TP.tp_mlp.fn, inputs, reference=reference, **options, **QUICK).results
    assert (result.verdict, result.culprit) == (verdict, culprit)
    assert expected in result.message, result.message


def _raises_before_a_collective_on_rank_1(x: torch.Tensor) -> torch.Tensor:
    if dist.get_rank() == 1:
        raise RuntimeError("out of memory, say")
    y = x.clone()
    dist.all_reduce(y)  # rank 0 waits here for rank 1, which never comes
    return y


def test_a_rank_that_raises_while_the_others_wait_in_a_collective_ends_the_check_at_once() -> None:
    started = time.monotonic()
    report = bc.check(
        _raises_before_a_collective_on_rank_1, (x64(4, 4),), world_size=2, placements=(Replicate(),),
        out_placements=(Partial(),), timeout=120, **QUICK,
    )
    (result,) = report.results
    assert result.verdict == "error" and "rank 1: _raises_before_a_collective_on_rank_1 raised RuntimeError" in result.message
    assert time.monotonic() - started < 30  # not the 120 s a collective would wait
    assert no_ranks_left()


def test_the_slip_is_told_once_per_run_from_the_referees_own_estimates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row of a numerical estimate runs the function on the ranks, a collective's latency
    each: the slip is told at the point whose message is shown (the first that fails), from the
    elements the referee estimated there, not estimated afresh at every point and dtype."""
    from backprop_check.engine.distributed import DistributedCase
    from backprop_check.sources.numerical import FiniteDifferences

    told, fresh, inside = [], [], []
    slip, estimate = DistributedCase._slip, FiniteDifferences.estimate

    def counted_slip(self: Any, name: str, point: Any, *args: Any, **kwargs: Any) -> Any:
        told.append((name, point.label))
        inside.append(True)
        try:
            return slip(self, name, point, *args, **kwargs)
        finally:
            inside.pop()

    def counted_estimate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if inside:
            fresh.append(args)
        return estimate(self, *args, **kwargs)

    monkeypatch.setattr(DistributedCase, "_slip", counted_slip)
    monkeypatch.setattr(FiniteDifferences, "estimate", counted_estimate)
    report = bc.run(str(EXAMPLE), devices=["cpu"], dtypes=["float64"], points=2, select="slip_doubled_all_reduce")
    (result,) = report.results
    assert (result.verdict, result.culprit) == ("mismatch", "autograd")
    assert "2× the true one" in result.message and "3 of 3 points disagree" in result.message, result.message
    assert len({label for _, label in told}) == 1, told  # one point, each wrong input once
    assert not fresh, fresh  # every element of these small tensors was estimated by the referee
    assert no_ranks_left()
