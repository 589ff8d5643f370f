"""Test doubles of the communication seam: torch.distributed called directly (the code path before the seam), and
a comm that records every operation it carries."""

from __future__ import annotations

import torch.distributed as dist

from megalith.core.distributed.comm import Comms, GroupComm


class DirectTorchComm(GroupComm):
    """torch.distributed called the way DDP, ZeRO-1 and PipeComm called it before the seam existed: the bucket
    all-reduce / reduce-scatter and the shard all-gather on the group, and P2POps to global ranks without a group."""

    def __init__(self, group):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)

    def all_reduce(self, tensor, op="sum", *, async_op=True):
        assert op == "sum"
        return dist.all_reduce(tensor, group=self.group, async_op=async_op)

    def reduce_scatter(self, out, inp, op="sum", *, async_op=True):
        assert op == "sum"
        return dist.reduce_scatter_tensor(out, inp, group=self.group, async_op=async_op)

    def all_gather(self, out, inp, *, async_op=True):
        return dist.all_gather_into_tensor(out, inp, group=self.group, async_op=async_op)

    def batch_p2p(self, ops):
        kinds = {"send": dist.isend, "recv": dist.irecv}
        return dist.batch_isend_irecv(
            [dist.P2POp(kinds[o.kind], o.tensor, dist.get_global_rank(self.group, o.peer), tag=o.tag) for o in ops]
        )


class RecordingComm(GroupComm):
    """Passes every operation to `inner` and logs it as (role, operation, elements)."""

    def __init__(self, inner: GroupComm, role: str, log: list):
        self.inner, self.role, self.log = inner, role, log
        self.group, self.size, self.rank = inner.group, inner.size, inner.rank
        self.closed = False

    def all_reduce(self, tensor, op="sum", *, async_op=True):
        self.log.append((self.role, "all_reduce", tensor.numel()))
        return self.inner.all_reduce(tensor, op, async_op=async_op)

    def reduce_scatter(self, out, inp, op="sum", *, async_op=True):
        self.log.append((self.role, "reduce_scatter", inp.numel()))
        return self.inner.reduce_scatter(out, inp, op, async_op=async_op)

    def all_gather(self, out, inp, *, async_op=True):
        self.log.append((self.role, "all_gather", out.numel()))
        return self.inner.all_gather(out, inp, async_op=async_op)

    def batch_p2p(self, ops):
        self.log += [(self.role, o.kind, o.tensor.numel()) for o in ops]
        return self.inner.batch_p2p(ops)

    def close(self):
        self.closed = True
        self.inner.close()


def wrap_comms(comms: Comms, make) -> Comms:
    """A Comms whose roles are `make(comm, role)`, one wrapper per distinct comm (as build_comms shares them)."""
    made = {}
    for role in ("dense", "expert", "pp"):
        comm = getattr(comms, role)
        made.setdefault(id(comm), make(comm, role))
    return Comms(comms.kind, *(made[id(getattr(comms, role))] for role in ("dense", "expert", "pp")))
