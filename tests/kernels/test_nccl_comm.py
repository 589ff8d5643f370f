"""megalith.core.distributed.nccl_comm on a CPU: the unique-id exchange over a gloo world (with the real
libnccl making the id) and every tensor argument check, which runs before anything reaches NCCL."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from megalith.core.distributed.nccl_comm import NcclCommunicator, exchange_unique_id
from megalith.kernels import nccl
from tests.harness import run_distributed


def _exchange_twice(rank, world_size):
    first = exchange_unique_id()
    second = exchange_unique_id(dist.new_group(list(range(world_size))))
    return first, second


@pytest.mark.parametrize("world_size", [2, 3])
def test_unique_id_exchange_over_gloo_gives_every_rank_rank0s_id(world_size):
    results = run_distributed(_exchange_twice, world_size)
    firsts = {first for first, _ in results}
    seconds = {second for _, second in results}
    assert len(firsts) == 1 and len(seconds) == 1  # every rank holds the same bytes
    (first,), (second,) = firsts, seconds
    assert len(first) == nccl.UNIQUE_ID_BYTES and any(first)
    assert first != second  # each exchange carries a new id made by ncclGetUniqueId


def _exchange_on_subgroup(rank, world_size):
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        return exchange_unique_id(sub)
    with pytest.raises(ValueError, match="not a member of group"):
        exchange_unique_id(sub)
    return None


def test_unique_id_exchange_over_a_subgroup_uses_the_groups_first_rank():
    results = run_distributed(_exchange_on_subgroup, 3)
    assert results[0] is None and results[1] == results[2] and len(results[1]) == nccl.UNIQUE_ID_BYTES


class _RecordingComm:
    """Stands in for megalith.kernels.nccl.Communicator; records whatever reaches it."""

    rank, size = 0, 2

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


@pytest.fixture
def comm():
    return NcclCommunicator(_RecordingComm(), torch.device("cuda", 0))


def _f32(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.all_reduce(_f32(8)), "tensor must be a CUDA tensor on cuda:0, got a tensor on cpu"),
        (lambda c: c.all_reduce(_f32(4, 6).t()), "tensor must be a contiguous dense tensor, got shape (6, 4)"),
        (lambda c: c.all_reduce(torch.ones(3, dtype=torch.bool)), "tensor has dtype torch.bool, which NCCL does not"),
        (lambda c: c.all_reduce(torch.ones(3, dtype=torch.complex64)), "tensor has dtype torch.complex64"),
        (lambda c: c.all_reduce(_f32(3).to(torch.float8_e4m3fn)), "tensor has dtype torch.float8_e4m3fn"),
        (lambda c: c.all_reduce([1.0, 2.0]), "tensor must be a torch.Tensor, got list"),
        (lambda c: c.all_reduce(_f32(8), op="mean"), "op must be one of sum, prod, max, min, avg"),
        (lambda c: c.all_reduce(_f32(8), op=dist.ReduceOp.BAND), "op must be one of"),
        (lambda c: c.reduce_scatter(_f32(4), _f32(7)), "inp must have size (2) times the elements of out (4), got 7"),
        (lambda c: c.reduce_scatter(_f32(4), _f32(8).double()), "out (torch.float32) and inp (torch.float64) must"),
        (lambda c: c.reduce_scatter(_f32(4), _f32(8)), "out must be a CUDA tensor on cuda:0, got a tensor on cpu"),
        (lambda c: c.reduce_scatter(_f32(4), _f32(4, 4)[:, :2]), "inp must be a contiguous dense tensor"),
        (lambda c: c.all_gather(_f32(9), _f32(4)), "out must have size (2) times the elements of inp (4), got 9"),
        (lambda c: c.all_gather(_f32(8), _f32(4).half()), "out (torch.float32) and inp (torch.float16) must"),
        (lambda c: c.all_gather(_f32(8), _f32(4)), "out must be a CUDA tensor on cuda:0"),
        (lambda c: c.broadcast(_f32(4), root=2), "root must be a rank in [0, 2) of this communicator, got 2"),
        (lambda c: c.broadcast(_f32(4), root=0), "tensor must be a CUDA tensor on cuda:0"),
        (lambda c: c.send(_f32(4), peer=-1), "peer must be a rank in [0, 2) of this communicator, got -1"),
        (lambda c: c.send(_f32(4), peer=1), "tensor must be a CUDA tensor on cuda:0"),
        (lambda c: c.recv(_f32(4), peer=5), "peer must be a rank in [0, 2) of this communicator, got 5"),
        (lambda c: c.recv(_f32(2, 2).t(), peer=1), "tensor must be a contiguous dense tensor"),
        (lambda c: c.register(_f32(4)), "tensor must be a CUDA tensor on cuda:0"),
        (lambda c: c.capture_all_reduce(_f32(4)), "tensor must be a CUDA tensor on cuda:0"),
    ],
)
def test_tensor_arguments_are_checked_before_reaching_nccl(comm, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(comm)
    assert comm.comm.calls == []


def test_reduce_ops_accept_names_and_torch_reduce_ops(comm):
    # On a CPU the call stops at the device check, after the op was accepted.
    for op in ("sum", "AVG", "max", "min", "prod", dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.MAX):
        with pytest.raises(ValueError, match="must be a CUDA tensor"):
            comm.all_reduce(_f32(2), op=op)


def test_communicator_device_must_be_cuda():
    with pytest.raises(ValueError, match="device must be a CUDA device with an index"):
        NcclCommunicator(_RecordingComm(), torch.device("cpu"))


def test_from_group_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        NcclCommunicator.from_group()
