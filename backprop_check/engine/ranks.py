"""The processes of a distributed check: `world_size` ranks of `torch.distributed`, asked to run
a request each and answer, within a time limit, with nothing left running after.

Two ways to have ranks:

- `Forked`: this process is the driver, not a rank. It forks `world_size` children (fork: they
  inherit the user's function and torch already imported, so a start costs a fraction of a
  second, not an interpreter and an `import torch` per rank), serves them a `TCPStore` on a port
  the OS picks (port 0: never one in use, and checks running side by side under `pytest -n 2`
  never meet), and each child joins the default process group (gloo on 127.0.0.1, its timeout
  the check's). Requests and answers travel over pipes, pickled.
- `Launched`: a launcher (`torchrun`) started this process as one rank of a group that exists
  already. Rank 0 is the driver and a rank at once; it broadcasts each request to the others,
  which serve it (`serve`) until rank 0 says the run is over.

A rank that raises answers with the error; the driver then tears every rank down (they may be
blocked in a collective that will never complete) and raises one `CaseError` naming the rank.
A request still unanswered at the time limit names the ranks still waiting (one that skipped a
collective leaves the others blocked in it).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from backprop_check.errors import CaseError, CaseTimeout, one_line

Handler = Callable[[dict[str, Any], int, int], Any]  # (request, rank, world_size) → answer
STOP = "stop"
# After a rank fails, how long the others get to answer before they are torn down.
GRACE = 0.5
# How often the driver looks at its ranks while waiting (a rank that died says nothing).
POLL = 0.2
# How much longer than the driver's time limit a rank's collectives wait (gloo's timeout).
COLLECTIVE_SLACK = 5.0


def pack(value: Any) -> bytes:
    """`value` pickled, its CPU tensors as numpy arrays: torch pickles every tensor through its
    storage, which costs a millisecond each; thousands of perturbed outputs go this way."""
    return pickle.dumps(_to_arrays(value), protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> Any:
    return _to_tensors(pickle.loads(data))


class _Array:
    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = array


def _to_arrays(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype not in (torch.bfloat16, torch.float16, torch.complex32):
        return _Array(value.detach().resolve_conj().resolve_neg().numpy())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_arrays(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_arrays(v) for k, v in value.items()}
    return value


def _to_tensors(value: Any) -> Any:
    if isinstance(value, _Array):
        return torch.from_numpy(value.array)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_tensors(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


class RankError(CaseError):
    """A rank raised while running the function; `rank` names it."""

    rank: int = -1


def _loopback() -> str | None:
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS), for gloo."""
    try:
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    except OSError:
        pass
    return None


class Forked:
    """`world_size` forked ranks serving `handler`, torn down by `close` (or on any failure)."""

    def __init__(self, handler: Handler, world_size: int, timeout: float, backend: str = "gloo") -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.closed = False
        self.requests = 0  # requests answered by every rank: what the benchmark counts
        context = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.processes = []
        for rank in range(world_size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_rank_main, args=(handler, rank, world_size, theirs, backend, timeout), daemon=True
            )
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
        # The store is made after the fork, so no child holds a copy of its server; port 0: the OS
        # picks a free one, which no other check can hold.
        try:
            self.store = torch.distributed.TCPStore(
                "127.0.0.1", 0, world_size + 1, True, timedelta(seconds=timeout), wait_for_workers=False
            )
            for pipe in self.pipes:
                pipe.send(self.store.port)
            self.gather(None, what="joining the process group")
        except BaseException:
            self.close()
            raise

    def ask(self, request: dict[str, Any]) -> list[Any]:
        """Every rank's answer to `request`, in rank order."""
        if self.closed:
            raise CaseError("the ranks were torn down after an earlier failure")
        payload = pack(request)
        try:
            for pipe in self.pipes:
                pipe.send_bytes(payload)
        except (BrokenPipeError, OSError):
            self.close()
            raise CaseError(f"a rank died ({self._deaths()})") from None
        answers = self.gather(request, what="running the function")
        self.requests += 1
        return answers

    def gather(self, request: dict[str, Any] | None, what: str) -> list[Any]:
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout
        failed: tuple[int, str] | None = None
        try:
            while len(answers) < self.world_size:
                waiting = {self.pipes[r]: r for r in range(self.world_size) if r not in answers}
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for pipe in wait(list(waiting), timeout=min(POLL, left)):
                    rank = waiting[pipe]
                    try:
                        status, body = unpack(pipe.recv_bytes())
                    except (EOFError, OSError):
                        status, body = "died", f"rank {rank} died ({self._deaths([rank])})"
                    answers[rank] = body
                    if status != "ok" and failed is None:
                        failed = (rank, body)
                        deadline = min(deadline, time.monotonic() + GRACE)  # the others may wait forever
                dead = [r for r in waiting.values() if r not in answers and not self.processes[r].is_alive()]
                if dead and failed is None:
                    failed = (dead[0], f"rank {dead[0]} died ({self._deaths(dead)})")
                    answers[dead[0]] = None
                    deadline = min(deadline, time.monotonic() + GRACE)
        except CaseTimeout as exc:  # the case's own time limit (runner): say who is still waiting
            still = [r for r in range(self.world_size) if r not in answers]
            self.close()
            raise CaseTimeout(f"{exc}; {_waiting(still, answers)}") from None
        except BaseException:
            self.close()
            raise
        if failed is not None:
            self.close()
            rank, message = failed
            error = RankError(message)
            error.rank = rank
            raise error
        if len(answers) < self.world_size:
            still = [r for r in range(self.world_size) if r not in answers]
            self.close()
            raise CaseError(f"{what} ran past the time limit of {self.timeout:g}s: {_waiting(still, answers)}")
        return [answers[r] for r in range(self.world_size)]

    def _deaths(self, ranks: list[int] | None = None) -> str:
        codes = []
        for rank in ranks if ranks is not None else range(self.world_size):
            process = self.processes[rank]
            process.join(0.05)
            if process.exitcode is not None:
                codes.append(f"rank {rank} exit code {process.exitcode}")
        return ", ".join(codes) or "no exit code yet"

    def close(self) -> None:
        """Stop every rank: asked first, then terminated, then killed; nothing is left running."""
        if self.closed:
            return
        self.closed = True
        for pipe in self.pipes:
            try:
                pipe.send_bytes(pickle.dumps({"kind": STOP}))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 1.0
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for pipe in self.pipes:
            pipe.close()
        store = getattr(self, "store", None)
        if store is not None:
            del self.store


def _waiting(still: list[int], answers: dict[int, Any]) -> str:
    listed = ", ".join(str(r) for r in still)
    done = sorted(answers)
    text = f"rank{'s' * (len(still) != 1)} {listed} still waiting"
    if done:
        text += f" while rank{'s' * (len(done) != 1)} {', '.join(map(str, done))} had finished"
    return text + " (a rank that skips a collective leaves the others blocked in it)"


def _rank_main(handler: Handler, rank: int, world_size: int, pipe: Connection, backend: str, timeout: float) -> None:
    """A forked rank: join the group through the driver's store, then serve requests until STOP."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver tears the ranks down on Ctrl-C
    torch.set_num_threads(1)
    try:
        port = pipe.recv()
        loopback = _loopback()
        if loopback and backend == "gloo":
            os.environ["GLOO_SOCKET_IFNAME"] = loopback
        store = torch.distributed.TCPStore("127.0.0.1", port, world_size + 1, False, timedelta(seconds=timeout))
        # gloo's own limit a little past the driver's, so that the driver, which knows which
        # ranks answered, is the one to say who is still waiting
        torch.distributed.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout + COLLECTIVE_SLACK)
        )
        pipe.send_bytes(pickle.dumps(("ok", None)))
    except BaseException as exc:  # noqa: BLE001 - said to the driver, then this rank ends
        _answer(pipe, ("error", f"rank {rank} could not join the process group: {type(exc).__name__}: {exc}"))
        return
    try:
        while True:
            try:
                request = unpack(pipe.recv_bytes())
            except (EOFError, OSError):  # the driver is gone
                return
            if request.get("kind") == STOP:
                return
            _answer(pipe, answer(handler, request, rank, world_size))
    finally:
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a failed collective cannot be destroyed cleanly
            pass


def answer(handler: Handler, request: dict[str, Any], rank: int, world_size: int) -> tuple[str, Any]:
    """("ok", what the handler returned) or ("error", one line naming the rank)."""
    try:
        return "ok", handler(request, rank, world_size)
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything; the driver says it
        return "error", f"rank {rank}: {exc if isinstance(exc, CaseError) else one_line(exc)}"


def _answer(pipe: Connection, message: tuple[str, Any]) -> None:
    try:
        pipe.send_bytes(pack(message))
    except (BrokenPipeError, OSError):
        pass


class Launched:
    """The ranks of a group a launcher started (`torchrun`): rank 0 drives, the others `serve`."""

    def __init__(self, handler: Handler, key: str) -> None:
        self.handler = handler
        self.key = key
        self.world_size = torch.distributed.get_world_size()
        self.closed = False

    def ask(self, request: dict[str, Any]) -> list[Any]:
        message = [{**request, "case": self.key}]
        torch.distributed.broadcast_object_list(message, src=0, group=_control_group())
        mine = answer(self.handler, request, 0, self.world_size)
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.gather_object(mine, gathered, dst=0, group=_control_group())
        for rank, (status, body) in enumerate(gathered):
            if status != "ok":
                error = RankError(body)
                error.rank = rank
                raise error
        return [body for _, body in gathered]

    def close(self) -> None:
        self.closed = True


_CONTROL: Any = None


def _control_group() -> Any:
    """A gloo group for requests between ranks, whatever backend the default group uses."""
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = torch.distributed.new_group(backend="gloo")
    return _CONTROL


def launched() -> bool:
    """Whether a launcher started this process as a rank (`RANK` and `WORLD_SIZE` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_launched_group() -> int:
    """Join the launcher's default group (once) and return this rank."""
    if not torch.distributed.is_initialized():
        # CPU tensors through gloo and CUDA ones through NCCL: a check runs on either device
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        # bounded: a rank that raised leaves the others in a collective until this, not 30 minutes
        from backprop_check.options import TIMEOUT

        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT + COLLECTIVE_SLACK))
    _control_group()
    return torch.distributed.get_rank()


def serve(handlers: Callable[[str], Handler | None]) -> None:
    """On a rank other than 0 under a launcher: answer rank 0's requests until it says STOP.
    `handlers(key)` finds the check a request names (every rank loaded the same case files)."""
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    while True:
        message: list[Any] = [None]
        torch.distributed.broadcast_object_list(message, src=0, group=_control_group())
        request = message[0]
        if request.get("kind") == STOP:
            return
        handler = handlers(request["case"])
        if handler is None:
            mine: tuple[str, Any] = ("error", f"rank {rank} has no check named {request['case']!r}")
        else:
            mine = answer(handler, request, rank, world_size)
        torch.distributed.gather_object(mine, None, dst=0, group=_control_group())


def stop_launched() -> None:
    """On rank 0 under a launcher: tell the other ranks the run is over."""
    torch.distributed.broadcast_object_list([{"kind": STOP}], src=0, group=_control_group())
