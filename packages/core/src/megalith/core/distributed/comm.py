"""The communication seam of data and pipeline parallelism: which transport carries the gradient-bucket reductions,
ZeRO-1's parameter all-gather and the pipeline's point-to-point transfers (`ParallelConfig.comm`).

A `GroupComm` is one process group's collectives on flat tensors, issued asynchronously and returning handles
with `wait()` (after which the result may be read on the current stream) and `is_completed()`:

- `TorchGroupComm`: torch.distributed over the group (NCCL or gloo, whatever the group's backend is); the
  default, and the only one on a CPU.
- `NcclGroupComm`: Megalith's own NCCL communicator (`megalith.core.distributed.nccl_comm`), made over the
  group. Each operation runs on the comm's own CUDA stream, which first waits for the work already queued on
  the caller's stream (so it sees the tensors as they are now); `wait()` makes the caller's stream wait for an
  event recorded after the operation. The compute stream thus runs on while the transfer is in flight, as with
  torch's asynchronous NCCL operations, and the tensors are marked as used on the comm stream
  (`Tensor.record_stream`) so the caching allocator does not hand their memory out before it has finished.

`build_comms(dims, kind)` makes the three comms Megalith routes through the seam (`Comms`): the dense and the
routed-expert gradient-reduction groups (`ParallelDims.grad_reduction`; one comm when they are the same group)
and the pipeline group. Ranks in a `GroupComm` (`P2POp.peer`) are ranks within its group, not global ranks.
Everything else (tensor-, context- and expert-parallel collectives, the loss and gradient-norm reductions, the
tied-embedding exchange) stays on torch.distributed.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.distributed as dist

from megalith.core.parallel_dims import COMMS, ParallelDims
from megalith.kernels import nccl

__all__ = [
    "Comms",
    "GroupComm",
    "Handle",
    "NcclGroupComm",
    "P2POp",
    "TorchGroupComm",
    "all_gather_into",
    "build_comms",
    "check_nccl_comm",
    "reduce_scatter_into",
]

_REDUCE_OPS = ("sum", "avg")


class Handle(Protocol):
    """An operation in flight."""

    def wait(self) -> object:
        """Blocks (torch) or orders the current stream after the operation (NCCL); its result is then readable."""

    def is_completed(self) -> bool:
        """Whether the operation has finished (the buffers it uses may then be freed or reused)."""


@dataclass(frozen=True, eq=False)
class P2POp:
    """One transfer of a `GroupComm.batch_p2p` batch: send `tensor` to, or receive into it from, rank `peer` of the
    group. `tag` distinguishes transfers between the same two ranks where the transport matches on it (gloo)."""

    kind: Literal["send", "recv"]
    tensor: torch.Tensor
    peer: int
    tag: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("send", "recv"):
            raise ValueError(f"P2POp.kind must be 'send' or 'recv', got {self.kind!r}")


def reduce_scatter_into(output: torch.Tensor, data: torch.Tensor, group, async_op: bool):
    """Sum-reduce-scatter `data` over `group` into `output` (torch renamed the op; accept both names)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, data, group=group, async_op=async_op)


def all_gather_into(output: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """All-gather equal `shard`s of every rank of `group` into `output` in rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, shard, group=group, async_op=async_op)


def _check_op(op: str) -> None:
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {', '.join(_REDUCE_OPS)}, got {op!r}")


class GroupComm(abc.ABC):
    """Collectives over one process group on flat tensors. Every rank of the group must issue the same operations
    in the same order (as with any collective); `async_op=False` waits before returning."""

    group: dist.ProcessGroup | None
    size: int
    """Ranks in the group."""
    rank: int
    """This rank's index in the group."""

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = True) -> Handle:
        """Reduces `tensor` in place over the group (op "sum" or "avg")."""

    @abc.abstractmethod
    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str = "sum", *, async_op: bool = True) -> Handle:
        """`out` = this rank's block (`size` equal blocks, in rank order) of `inp` reduced over the group."""

    @abc.abstractmethod
    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = True) -> Handle:
        """`out` = every rank's `inp`, concatenated in rank order (`out` has `size` times its elements)."""

    @abc.abstractmethod
    def batch_p2p(self, ops: Sequence[P2POp]) -> list[Handle]:
        """Posts the sends and receives of `ops` together; one handle per op (handles may be shared)."""

    def close(self) -> None:  # noqa: B027 (torch's groups outlive the comm; only NCCL has something to free)
        """Frees what the comm holds (call on every rank); the comm is unusable afterwards."""


class _Done:
    """The handle of an operation that has already completed."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _Divided:
    """A torch sum that `wait()` turns into the average (gloo has no AVG reduction)."""

    def __init__(self, work, tensor: torch.Tensor, size: int) -> None:
        self._work, self._tensor, self._size, self._done = work, tensor, size, False

    def wait(self) -> bool:
        if not self._done:
            self._work.wait()
            self._tensor.div_(self._size)
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done


class TorchGroupComm(GroupComm):
    """The seam over torch.distributed: each operation is the torch collective on `group`, returning its `Work`.

    Args:
        group: the process group (None: one process without torch.distributed, where the operations are the
            one-rank identities).
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self._distributed = dist.is_available() and dist.is_initialized()
        if group is None and not self._distributed:
            self.size, self.rank, self._native_avg = 1, 0, False
            return
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._native_avg = "nccl" in str(dist.get_backend(group))  # ReduceOp.AVG is an NCCL-only reduction

    def _alone(self) -> bool:
        return not self._distributed

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = True) -> Handle:
        _check_op(op)
        if self._alone():
            return _Done()
        if op == "avg" and not self._native_avg:
            handle = _Divided(dist.all_reduce(tensor, group=self.group, async_op=True), tensor, self.size)
        else:
            reduce = dist.ReduceOp.AVG if op == "avg" else dist.ReduceOp.SUM
            handle = dist.all_reduce(tensor, op=reduce, group=self.group, async_op=async_op) or _Done()
        if not async_op:
            handle.wait()
        return handle

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str = "sum", *, async_op: bool = True) -> Handle:
        _check_op(op)
        if self._alone():
            out.copy_(inp)
            return _Done()
        # The torch op sums; an average is that sum divided (gloo has no AVG, and NCCL's divides the same way).
        handle = reduce_scatter_into(out, inp, self.group, async_op=True)
        handle = _Divided(handle, out, self.size) if op == "avg" else handle
        if not async_op:
            handle.wait()
        return handle

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = True) -> Handle:
        if self._alone():
            out.copy_(inp)
            return _Done()
        handle = all_gather_into(out, inp, self.group, async_op=async_op) or _Done()
        if not async_op:
            handle.wait()
        return handle

    def batch_p2p(self, ops: Sequence[P2POp]) -> list[Handle]:
        if not ops:
            return []
        if self._alone():
            raise ValueError("batch_p2p: a one-process comm has no peer to send to or receive from")
        torch_ops = [
            dist.P2POp(
                dist.isend if op.kind == "send" else dist.irecv,
                op.tensor,
                dist.get_global_rank(self.group, op.peer),
                self.group,
                op.tag,
            )
            for op in ops
        ]
        return list(dist.batch_isend_irecv(torch_ops))


class _EventHandle:
    """An NCCL operation issued on a comm stream: an event recorded on that stream after it."""

    def __init__(self, event: torch.cuda.Event, comm, device: torch.device) -> None:
        self._event, self._comm, self._device = event, comm, device

    def wait(self) -> bool:
        torch.cuda.current_stream(self._device).wait_event(self._event)
        self._comm.check()  # the watchdog aborted the communicator (timeout, dead peer): raise here, not hang
        return True

    def is_completed(self) -> bool:
        return self._event.query()


class NcclGroupComm(GroupComm):
    """The seam over Megalith's NCCL communicator of `group`, made when this is built (collective over `group`).

    Args:
        group: an initialised torch process group (the unique id travels over it); `build_comms` makes one only
            for groups of more than one rank.
        device: this rank's CUDA device (default: the current one).
        timeout: seconds after which an unfinished operation aborts the communicator, which then raises.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        device: torch.device | int | None = None,
        timeout: float = nccl.DEFAULT_TIMEOUT,
    ) -> None:
        from megalith.core.distributed.nccl_comm import NcclCommunicator

        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._comm = NcclCommunicator.from_group(group, device=device, timeout=timeout)
        self.device = self._comm.device
        self._stream = torch.cuda.Stream(self.device)

    @property
    def communicator(self):
        """The `NcclCommunicator` the operations go through."""
        return self._comm

    @property
    def stream(self) -> torch.cuda.Stream:
        """The CUDA stream the operations run on."""
        return self._stream

    def _issue(self, launch, tensors: Sequence[torch.Tensor]) -> _EventHandle:
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)  # the inputs as the caller's stream leaves them
        with torch.cuda.stream(self._stream):
            launch()
        for t in tensors:  # their memory must outlive the operation even if the caller drops them first
            t.record_stream(self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        return _EventHandle(event, self._comm, self.device)

    def _finish(self, handle: _EventHandle, async_op: bool) -> _EventHandle:
        if not async_op:
            handle.wait()
        return handle

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, async_op: bool = True) -> Handle:
        _check_op(op)
        handle = self._issue(lambda: self._comm.all_reduce(tensor, op), [tensor])
        return self._finish(handle, async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: str = "sum", *, async_op: bool = True) -> Handle:
        _check_op(op)
        handle = self._issue(lambda: self._comm.reduce_scatter(out, inp, op), [out, inp])
        return self._finish(handle, async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, *, async_op: bool = True) -> Handle:
        handle = self._issue(lambda: self._comm.all_gather(out, inp), [out, inp])
        return self._finish(handle, async_op)

    def batch_p2p(self, ops: Sequence[P2POp]) -> list[Handle]:
        if not ops:
            return []

        def launch() -> None:
            with self._comm.group():  # one fused launch, so opposite-direction pairs cannot deadlock
                for op in ops:
                    (self._comm.send if op.kind == "send" else self._comm.recv)(op.tensor, op.peer)

        handle = self._issue(launch, [op.tensor for op in ops])
        return [handle] * len(ops)

    def close(self) -> None:
        self._comm.close()


@dataclass(frozen=True, eq=False)
class Comms:
    """The comms Megalith routes through the seam: `dense` and `expert` reduce (and ZeRO-1 gathers) the gradients
    and parameters of dense and routed-expert buckets, `pp` carries the pipeline's activations and gradients."""

    kind: str
    dense: GroupComm
    expert: GroupComm
    pp: GroupComm

    @classmethod
    def default(cls, dims: ParallelDims) -> Comms:
        """The torch.distributed comms of `dims` (what DDP and the pipeline use when given none; nothing to close)."""
        return build_comms(dims, "torch")

    def grad(self, expert: bool) -> GroupComm:
        """The comm of a gradient bucket: routed experts (`expert`) or dense parameters."""
        return self.expert if expert else self.dense

    def close(self) -> None:
        """Closes every distinct comm once (on every rank); calling it again does nothing more."""
        seen: set[int] = set()
        errors = []
        for comm in (self.dense, self.expert, self.pp):
            if id(comm) in seen:
                continue
            seen.add(id(comm))
            try:
                comm.close()
            except Exception as exc:  # close the others anyway, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]


def check_nccl_comm(device: torch.device | str | None) -> None:
    """Raises ValueError unless `parallel.comm=nccl` can run: a CUDA device and a CUDA build of megalith-kernels."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        raise ValueError(
            f"parallel.comm='nccl' needs a CUDA device, but training runs on {device}; use parallel.comm=torch"
        )
    if not nccl.has_communicator():
        raise ValueError(
            "parallel.comm='nccl' needs megalith-kernels built with CUDA (this build has no NCCL communicator: "
            "rebuild with MEGALITH_CUDA=ON), or use parallel.comm=torch"
        )


def build_comms(
    dims: ParallelDims,
    kind: str = "torch",
    *,
    device: torch.device | str | None = None,
    timeout: float = nccl.DEFAULT_TIMEOUT,
) -> Comms:
    """The comms of `dims` over transport `kind` (collective: every rank calls it, in the same order).

    Args:
        dims: the topology; the comms are made over its dense and expert gradient-reduction groups and its
            pipeline group (a group two roles share gets one comm).
        kind: "torch" (torch.distributed) or "nccl" (Megalith's NCCL communicator; groups of one rank, which
            never communicate, stay on torch).
        device: this rank's device ("nccl" needs a CUDA one).
        timeout: seconds before an unfinished NCCL operation aborts its communicator ("nccl" only).

    Returns:
        The comms; `close()` them at the end of the run (also after an error).
    """
    if kind not in COMMS:
        raise ValueError(f"parallel.comm must be one of {', '.join(COMMS)}, got {kind!r}")
    if kind == "nccl":
        check_nccl_comm(device)
    roles = {
        "dense": dims.grad_reduction(expert=False)[0],
        "expert": dims.grad_reduction(expert=True)[0],
        "pp": dims.pp_group,
    }
    made: dict[int, GroupComm] = {}
    try:
        for group in roles.values():  # the same order on every rank: making an NCCL communicator is collective
            if id(group) in made:
                continue
            alone = group is None or dist.get_world_size(group) == 1
            made[id(group)] = (
                TorchGroupComm(group)
                if kind == "torch" or alone
                else NcclGroupComm(group, device=device, timeout=timeout)
            )
    except BaseException:
        for comm in made.values():
            with contextlib.suppress(Exception):
                comm.close()
        raise
    return Comms(kind, *(made[id(group)] for group in roles.values()))
