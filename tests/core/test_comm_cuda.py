"""NcclGroupComm on a GPU (marked cuda), at world size 1: each operation gives what TorchGroupComm gives for the same
call, on its own stream yet ordered after the work queued before it and before the work queued after `wait()`."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalith.core import ParallelDims
from megalith.core.distributed.comm import NcclGroupComm, P2POp, TorchGroupComm, build_comms

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def comms():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        direct = NcclGroupComm(dist.group.WORLD, timeout=120)
        yield direct, TorchGroupComm(dist.group.WORLD)
        direct.close()
    finally:
        dist.destroy_process_group()


def _random(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_reductions_match_torch(comms, dtype, op):
    direct, reference = comms
    data = _random(96, dtype, 1)
    # torch's side runs on gloo with CPU tensors, in float32 (gloo's bf16 support varies between torch versions);
    # at one rank both reductions are exact, so the bf16 result must be the float32 one rounded.
    on_gpu, on_cpu = data.cuda(), data.float()
    direct.all_reduce(on_gpu, op).wait()
    reference.all_reduce(on_cpu, op).wait()
    assert torch.equal(on_gpu.cpu(), on_cpu.to(dtype))
    out_gpu, out_cpu = torch.full((96,), float("nan"), dtype=dtype, device="cuda"), torch.empty(96)
    direct.reduce_scatter(out_gpu, data.cuda(), op, async_op=False)
    reference.reduce_scatter(out_cpu, data.float(), op, async_op=False)
    assert torch.equal(out_gpu.cpu(), out_cpu.to(dtype))


def test_all_gather_and_p2p(comms):
    direct, reference = comms
    data = _random(40, torch.float32, 2)
    out_gpu, out_cpu = torch.full((40,), float("nan"), device="cuda"), torch.empty(40)
    handle = direct.all_gather(out_gpu, data.cuda())
    reference.all_gather(out_cpu, data.clone()).wait()
    handle.wait()
    assert torch.equal(out_gpu.cpu(), out_cpu)
    # A send to itself and the matching receive in one batch (NCCL allows a rank to be its own peer).
    received = torch.full((40,), float("nan"), device="cuda")
    handles = direct.batch_p2p([P2POp("send", data.cuda(), 0), P2POp("recv", received, 0)])
    assert len(handles) == 2
    for h in handles:
        h.wait()
    assert torch.equal(received.cpu(), data)
    torch.cuda.synchronize()
    assert all(h.is_completed() for h in handles)


def test_operations_are_ordered_against_the_callers_stream(comms):
    """The input is produced by a long computation queued just before the call, and the result is read right after
    `wait()`: without the event ordering the comm stream would gather stale NaNs or the reader would see them."""
    direct, _ = comms
    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        x = torch.randn(2048, 2048, device="cuda") / 2048**0.5
        source = torch.full((64,), float("nan"), device="cuda")
        y = x
        for _ in range(20):
            y = y @ x
        source.copy_(y[0, :64])
        out = torch.full((64,), float("nan"), device="cuda")
        handle = direct.all_gather(out, source)
        assert direct.stream != caller
        handle.wait()
        doubled = out * 2
    caller.synchronize()
    expected = y[0, :64].cpu()
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(doubled.cpu(), expected * 2)


def test_build_comms_keeps_one_rank_groups_on_torch(comms):
    # At world size 1 no group has a second rank, so nothing is worth an NCCL communicator.
    built = build_comms(ParallelDims(), "nccl", device=torch.device("cuda", torch.cuda.current_device()))
    assert built.kind == "nccl"
    assert all(isinstance(getattr(built, role), TorchGroupComm) for role in ("dense", "expert", "pp"))
    built.close()
