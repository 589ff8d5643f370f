"""Runs a test function in N spawned processes that form a torch.distributed world on free local ports.

Each rank sees the same environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE), with the rendezvous store held by the test process, so code under
test can call `init_process_group("gloo")` itself or let the harness do it. A rank that raises fails the test
with every rank's traceback; a world that hangs is stopped after `timeout` seconds (after dumping each rank's
Python stack to stderr) and fails that test only.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["DistributedTestError", "run_distributed"]

# Processes are forked from a server that has already imported these, which saves most of the start-up cost
# of each rank (importing torch dominates it) while keeping the children free of the test process's threads.
_PRELOAD = ["torch", "torch.distributed", "numpy"]


class DistributedTestError(AssertionError):
    """One or more ranks of a distributed test failed, hung or died."""


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _rank_main(fn, rank, world_size, port, conn, args, kwargs, init, backend, timeout):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS="1",
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        result = fn(rank, world_size, *args, **kwargs)
        conn.send_bytes(pickle.dumps(("ok", result)))
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 240.0,
    init: bool = True,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Runs `fn(rank, world_size, *args, **kwargs)` on `world_size` processes and returns each rank's result.

    Args:
        fn: a module-level function (it is pickled by reference into the children).
        world_size: number of ranks.
        timeout: seconds after which a world that has not finished is killed and the test fails.
        init: initialise the default process group before calling `fn` (else `fn` must, e.g. from the env).
        backend: process-group backend, "gloo" for CPU tests.

    Returns:
        The value each rank returned, indexed by rank (values are pickled back, tensors included).

    Raises:
        DistributedTestError: a rank raised (all tracebacks are shown), exited without reporting, or the
            world did not finish within `timeout`.
    """
    import torch.distributed as dist

    ctx = _context()
    # The rendezvous store lives here, like torchrun's agent store; ranks connect to it as clients.
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout)
    )
    pipes, procs = [], []
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, store.port, child_end, args, kwargs, init, backend, timeout),
            name=f"rank{rank}",
            daemon=True,
        )
        proc.start()
        child_end.close()
        pipes.append(parent_end)
        procs.append(proc)
    try:
        outcomes = _collect(pipes, procs, timeout)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        del store
    # `outcomes` is in arrival order, so the first failure listed is the one that set the others off.
    errors = {rank: detail for rank, (status, detail) in outcomes.items() if status != "ok"}
    if errors:
        first = next(iter(errors))
        parts = [f"--- rank {rank} ({outcomes[rank][0]}) ---\n{errors[rank]}" for rank in sorted(errors)]
        raise DistributedTestError(
            f"{len(errors)} of {world_size} ranks failed in {getattr(fn, '__name__', fn)} "
            f"(first: rank {first})\n" + "\n".join(parts)
        )
    return [outcomes[rank][1] for rank in range(world_size)]


def _collect(pipes, procs, timeout):
    """Waits for every rank's report; stops early once a rank fails and the others had a moment to report.

    Returns a dict ordered by arrival: the rank that failed first comes first.
    """
    outcomes: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    grace_deadline = None  # after the first failure, others get a few seconds to report theirs
    pending = set(range(len(procs)))
    while pending:
        now = time.monotonic()
        limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
        if now >= limit:
            break
        ready = mp_connection.wait(
            [pipes[r] for r in pending] + [procs[r].sentinel for r in pending], timeout=min(1.0, limit - now)
        )
        for rank in list(pending):
            if pipes[rank] in ready or pipes[rank].poll():
                try:
                    outcomes[rank] = pickle.loads(pipes[rank].recv_bytes())
                except EOFError:
                    outcomes[rank] = ("died", f"exited with code {procs[rank].exitcode} without reporting")
                pending.discard(rank)
            elif procs[rank].sentinel in ready and not pipes[rank].poll():
                procs[rank].join(1)
                outcomes[rank] = ("died", f"exited with code {procs[rank].exitcode} without reporting")
                pending.discard(rank)
        if grace_deadline is None and any(status != "ok" for status, _ in outcomes.values()):
            grace_deadline = time.monotonic() + 5.0
    for rank in pending:
        if procs[rank].is_alive():
            os.kill(procs[rank].pid, signal.SIGUSR1)  # faulthandler prints where this rank is stuck
    if pending:
        time.sleep(0.5)
    for rank in pending:
        reason = "timed out" if grace_deadline is None else "stopped after another rank failed"
        outcomes[rank] = (
            "hung" if grace_deadline is None else "stopped",
            f"{reason} after {timeout:.0f}s limit (stack dumped to stderr above)" if grace_deadline is None else reason,
        )
    return outcomes
