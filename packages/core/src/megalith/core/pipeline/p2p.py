"""Point-to-point transfers between neighbouring pipeline ranks, batched with torch.distributed.batch_isend_irecv.

Sends are deferred and posted in one batch together with the next receive (Megatron's combined
"send forward, receive backward" pattern), so that two neighbours exchanging in opposite directions post
matching operations in one group, which NCCL needs. Only the receive is waited for: a send completes in the
background (waiting for it would make the interleaved schedule wait on a peer that is itself waiting), and
its activation is released once it has. Tags name the receiving virtual stage, the micro-batch and the
direction (gloo matches on them; NCCL relies on both sides posting in the same order, as the schedules do).
The batches go through the pipeline group's `GroupComm` (`megalith.core.distributed.comm`: torch.distributed, or
Megalith's NCCL communicator with `parallel.comm=nccl`), whose ranks are ranks within the pipeline group.

`post` is the overlapped variant (`overlap_p2p_comm`): it posts the queued sends right after the pass that made
them, together with receives for passes that come later, and waits for nothing; each receive is waited for right
before its pass reads it, so a transfer runs while this rank computes another pass. It is for gloo only: NCCL
matches point-to-point operations between two ranks in posting order and completes a batch as a whole, and posting
receives ahead changes that order when both neighbours are one rank (pp = 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megalith.core.distributed.comm import GroupComm, P2POp, TorchGroupComm
from megalith.core.parallel_dims import ParallelDims

__all__ = ["PipeComm"]


class PipeComm:
    """Activation/gradient exchange with the previous and next rank of the pipeline ring.

    Args:
        dims: the topology (pp, pp_rank, pp_group).
        comm: the transport over the pipeline group (`Comms.pp`; default: torch.distributed over `dims.pp_group`).
    """

    def __init__(self, dims: ParallelDims, comm: GroupComm | None = None) -> None:
        self.pp, self.pp_rank = dims.pp, dims.pp_rank
        self.comm = comm or TorchGroupComm(dims.pp_group)
        if self.comm.size != self.pp:
            raise ValueError(f"PipeComm: comm has {self.comm.size} ranks, the pipeline {self.pp}")
        if self.pp > 1:  # ranks within the pipeline group
            self.prev = (self.pp_rank - 1) % self.pp
            self.next = (self.pp_rank + 1) % self.pp
        self._pending: list[tuple[torch.Tensor, int, int, Callable[[], None] | None]] = []
        self._inflight: list[tuple[object, torch.Tensor, Callable[[], None] | None]] = []

    def send(self, tensor: torch.Tensor, to_next: bool, tag: int, on_sent: Callable[[], None] | None = None) -> None:
        """Queues `tensor` for the next flush; `on_sent` runs once the transfer has completed."""
        self._pending.append((tensor, self.next if to_next else self.prev, tag, on_sent))

    def flush(self, recv: tuple[torch.Tensor, bool, int] | None = None) -> None:
        """Posts the queued sends and the optional receive `(buffer, from_next, tag)` as one batch and waits
        for the receive."""
        ops = [P2POp("send", t, peer, tag) for t, peer, tag, _ in self._pending]
        if recv is not None:
            buffer, from_next, tag = recv
            ops.append(P2POp("recv", buffer, self.next if from_next else self.prev, tag))
        if ops:
            works = self.comm.batch_p2p(ops)
            if len(works) == len(ops):
                if recv is not None:
                    works.pop().wait()
                self._inflight += [(w, t, cb) for w, (t, _, _, cb) in zip(works, self._pending, strict=True)]
            else:  # one work for the coalesced group (NCCL): its wait only orders the compute stream after it
                for w in works:
                    w.wait()
                self._inflight += [(None, t, cb) for t, _, _, cb in self._pending]
        self._pending = []
        self._retire(block=False)

    def post(self, recvs: Sequence[tuple[torch.Tensor, bool, int]] = ()) -> list[object]:
        """Posts the queued sends and the receives `(buffer, from_next, tag)` as one batch without waiting.

        Returns:
            One handle per receive, in order: its `wait()` returns once the buffer holds the data.
        """
        ops = [P2POp("send", t, peer, tag) for t, peer, tag, _ in self._pending]
        ops += [P2POp("recv", b, self.next if nxt else self.prev, tag) for b, nxt, tag in recvs]
        handles: list[object] = []
        if ops:
            works = self.comm.batch_p2p(ops)
            if len(works) != len(ops):  # NCCL's coalesced group completes as a whole (see the module docstring)
                raise RuntimeError("PipeComm.post needs one work per operation (the gloo backend)")
            sends = len(self._pending)
            handles = works[sends:]
            self._inflight += [(w, t, cb) for w, (t, _, _, cb) in zip(works[:sends], self._pending, strict=True)]
        self._pending = []
        self._retire(block=False)
        return handles

    def _retire(self, block: bool) -> None:
        still = []
        for work, tensor, on_sent in self._inflight:
            if work is not None and not work.is_completed():
                if not block:
                    still.append((work, tensor, on_sent))
                    continue
                work.wait()
            if on_sent is not None:
                on_sent()
        self._inflight = still

    def finish(self) -> None:
        """Flushes what is queued and waits for every send to complete."""
        self.flush()
        self._retire(block=True)
