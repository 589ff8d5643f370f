"""The NCCL communicator on a GPU (marked cuda): every operation at world size 1 against the expected result
(out of place, so a wrong pointer, count or dtype shows), CUDA-graph capture and replay, buffer registration,
the watchdog's timeout, argument checks of the pointer-level API, and a peer leaving (needs two GPUs)."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.distributed as dist

from megalith.core.distributed.nccl_comm import NcclCommunicator
from megalith.kernels import nccl
from tests.harness import run_distributed

pytestmark = pytest.mark.cuda

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random(n: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(n, device="cuda").to(dtype)
    return torch.randint(0 if dtype == torch.uint8 else -1000, 200 if dtype == torch.uint8 else 1000, (n,),
                         device="cuda", dtype=dtype)  # fmt: skip


def _poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan") if t.dtype.is_floating_point else 77)


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


@pytest.fixture(scope="module")
def raw():
    comm = nccl.Communicator(nccl.unique_id(), 0, 1, torch.cuda.current_device(), timeout=120)
    yield comm
    comm.close()


@pytest.fixture(scope="module")
def comm():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        communicator = NcclCommunicator.from_group(timeout=120)
        yield communicator
        communicator.close()
    finally:
        dist.destroy_process_group()


# ---- pointer-level API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", _DTYPES, ids=_name)
@pytest.mark.parametrize("op", ["sum", "max", "min", "avg"])
def test_all_reduce_out_of_place_copies_the_single_ranks_values(raw, dtype, op):
    if op == "avg" and not dtype.is_floating_point:
        pytest.skip("avg is meant for floating-point data")
    src = _random(3001, dtype)
    dst = _poisoned_like(src)
    raw.all_reduce(src.data_ptr(), dst.data_ptr(), src.numel(), _name(dtype), op, _stream())
    raw.synchronize()
    torch.testing.assert_close(dst, src, rtol=0, atol=0, equal_nan=False)


def test_count_limits_the_elements_touched(raw):
    src, dst = _random(1000, torch.float32), torch.zeros(1000, device="cuda")
    raw.all_reduce(src.data_ptr(), dst.data_ptr(), 600, "float32", "sum", _stream())
    raw.synchronize()
    assert torch.equal(dst[:600], src[:600]) and not dst[600:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=_name)
def test_reduce_scatter_all_gather_broadcast_at_world_size_one(raw, dtype):
    src = _random(4096, dtype)
    for run in (
        lambda d: raw.reduce_scatter(src.data_ptr(), d.data_ptr(), src.numel(), _name(dtype), "sum", _stream()),
        lambda d: raw.all_gather(src.data_ptr(), d.data_ptr(), src.numel(), _name(dtype), _stream()),
        lambda d: raw.broadcast(src.data_ptr(), d.data_ptr(), src.numel(), _name(dtype), 0, _stream()),
    ):
        dst = _poisoned_like(src)
        run(dst)
        raw.synchronize()
        assert torch.equal(dst, src)


def test_send_and_recv_to_self_in_a_group(raw):
    src = _random(5000, torch.bfloat16)
    dst = _poisoned_like(src)
    with nccl.group():
        raw.send(src.data_ptr(), src.numel(), "bfloat16", 0, _stream())
        raw.recv(dst.data_ptr(), dst.numel(), "bfloat16", 0, _stream())
    raw.synchronize()
    assert torch.equal(dst, src)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c, p: c.all_reduce(p, p, -1, "float32", "sum", 0), ValueError, "count must be >= 0, got -1"),
        (lambda c, p: c.all_reduce(p, p, 4, 42, "sum", 0), ValueError, "dtype code 42 is not an NCCL type"),
        (lambda c, p: c.all_reduce(p, p, 4, "bool", "sum", 0), ValueError, "dtype 'bool' is not an NCCL type"),
        (lambda c, p: c.all_reduce(p, p, 4, "float32", 9, 0), ValueError, "op code 9 is not an NCCL reduction"),
        (lambda c, p: c.all_reduce(p, p, 4, "float32", "mean", 0), ValueError, "op 'mean' is not an NCCL reduction"),
        (lambda c, p: c.all_reduce(0, p, 4, "float32", "sum", 0), ValueError, "send is a null pointer"),
        (lambda c, p: c.reduce_scatter(p, p, -2, "float32", "sum", 0), ValueError, "recv_count must be >= 0"),
        (lambda c, p: c.all_gather(p, 0, 4, "float32", 0), ValueError, "recv is a null pointer"),
        (lambda c, p: c.broadcast(p, p, 4, "float32", 1, 0), ValueError, "root must be a rank in [0, 1), got 1"),
        (lambda c, p: c.send(p, 4, "float32", 3, 0), ValueError, "peer must be a rank in [0, 1), got 3"),
        (lambda c, p: c.recv(0, 4, "float32", 0, 0), ValueError, "buffer is a null pointer"),
        (lambda c, p: c.register(p, 0), ValueError, "nbytes must be > 0, got 0"),
    ],
)
def test_pointer_api_arguments_are_checked(raw, call, error, message):
    buffer = torch.zeros(16, device="cuda")
    with pytest.raises(error, match=re.escape(message)):
        call(raw, buffer.data_ptr())
    raw.check()  # a bad argument leaves the communicator usable


def test_group_end_without_start_is_an_error():
    with pytest.raises(ValueError, match=r"group_end\(\) was called without a matching group_start\(\)"):
        nccl.group_end()


def test_graph_capture_and_replay_of_an_all_reduce(raw):
    src, dst = _random(1 << 16, torch.float32), torch.zeros(1 << 16, device="cuda")
    raw.all_reduce(src.data_ptr(), dst.data_ptr(), src.numel(), "float32", "sum", _stream())  # connect eagerly
    raw.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        raw.all_reduce(src.data_ptr(), dst.data_ptr(), src.numel(), "float32", "sum", _stream())
    for _ in range(3):  # the replay reduces whatever src holds now
        src.copy_(torch.randn_like(src))
        dst.fill_(float("nan"))
        graph.replay()
        raw.watch(_stream())
        raw.synchronize()
        assert torch.equal(dst, src)


def test_buffer_registration_with_nccl_memory(raw):
    if not nccl.library_info()["registration"]:
        pytest.skip("the loaded NCCL has no ncclCommRegister/ncclMemAlloc (needs 2.19)")
    n = 1 << 18
    src, dst = _random(n, torch.float32), torch.zeros(n, device="cuda")
    ptr = nccl.mem_alloc(n * 4, torch.cuda.current_device())
    try:
        handle = raw.register(ptr, n * 4)
        raw.all_reduce(src.data_ptr(), ptr, n, "float32", "sum", _stream())  # into the registered buffer
        raw.all_reduce(ptr, dst.data_ptr(), n, "float32", "sum", _stream())  # and out of it
        raw.synchronize()
        raw.deregister(handle)
    finally:
        torch.cuda.synchronize()
        nccl.mem_free(ptr, torch.cuda.current_device())
    assert torch.equal(dst, src)


def test_an_operation_that_does_not_finish_in_time_aborts_the_communicator():
    comm = nccl.Communicator(nccl.unique_id(), 0, 1, torch.cuda.current_device(), timeout=0.5)
    x = torch.ones(1024, device="cuda")
    torch.cuda._sleep(5_000_000_000)  # a few seconds of GPU time ahead of the all-reduce on this stream
    comm.all_reduce(x.data_ptr(), x.data_ptr(), x.numel(), "float32", "sum", _stream())
    start = time.monotonic()
    with pytest.raises(nccl.NcclTimeoutError, match=r"all_reduce did not complete within 0.5 s of being enqueued"):
        comm.synchronize()
    assert time.monotonic() - start < 60
    torch.cuda.synchronize()
    assert "did not complete" in comm.failure
    with pytest.raises(nccl.NcclTimeoutError, match=r"rank 0 of 1, cuda:\d+\) was aborted"):
        comm.all_reduce(x.data_ptr(), x.data_ptr(), x.numel(), "float32", "sum", _stream())
    comm.close()  # an aborted communicator closes quietly
    assert comm.closed


# ---- tensor API (megalith.core.distributed.nccl_comm) ---------------------------------------------------------


def test_tensor_collectives_at_world_size_one(comm):
    x = _random(10_000, torch.bfloat16)
    expected = x.clone()
    comm.all_reduce(x, op="avg")
    comm.all_reduce(x, op=dist.ReduceOp.MAX)
    out = _poisoned_like(x)
    comm.reduce_scatter(out, x)
    gathered = _poisoned_like(x)
    comm.all_gather(gathered, out)
    comm.broadcast(gathered, root=0)
    received = _poisoned_like(x)
    with comm.group():
        comm.send(gathered, peer=0)
        comm.recv(received, peer=0)
    comm.synchronize()
    assert torch.equal(received, expected)


def test_captured_all_reduce_replays(comm):
    x = _random(1 << 14, torch.float32)
    captured = comm.capture_all_reduce(x, op="sum")
    for _ in range(2):
        values = torch.randn_like(x)
        x.copy_(values)
        captured.replay()
        comm.synchronize()
        assert torch.equal(x, values)


def test_registered_tensor_is_usable(comm):
    if not nccl.library_info()["registration"]:
        pytest.skip("the loaded NCCL has no ncclCommRegister (needs 2.19)")
    x = _random(1 << 16, torch.float32)
    expected = x.clone()
    handle = comm.register(x)
    comm.all_reduce(x)
    comm.synchronize()
    comm.deregister(handle)
    assert torch.equal(x, expected)


def test_tensor_on_the_wrong_device_is_refused(comm):
    with pytest.raises(ValueError, match=r"tensor must be a CUDA tensor on cuda:\d+, got a tensor on cpu"):
        comm.all_reduce(torch.ones(4))


# ---- a peer leaving (two GPUs) ------------------------------------------------------------------------------


def _peer_leaves(rank, world_size):
    torch.cuda.set_device(rank)
    comm = NcclCommunicator.from_group(timeout=10)
    x = torch.ones(1 << 20, device="cuda")
    comm.all_reduce(x)
    comm.synchronize()
    assert torch.all(x == world_size)
    dist.barrier()
    if rank == 1:
        return "left"  # rank 1 stops taking part; its communicator is destroyed on the way out
    start = time.monotonic()
    try:
        comm.all_reduce(x)
        comm.synchronize()
    except nccl.NcclError as exc:
        return type(exc).__name__, time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_every_remaining_rank_raises_within_the_timeout_when_a_peer_leaves():
    results = run_distributed(_peer_leaves, 2, timeout=120)
    assert results[1] == "left"
    kind, elapsed = results[0]
    assert kind in ("NcclError", "NcclTimeoutError") and elapsed < 10 + 30, results[0]
