"""The communication seam (`megalith.core.distributed.comm`) on gloo: TorchGroupComm's operations against the values
they must produce; DDP, ZeRO-1 and the pipeline through the seam bit-identical to torch.distributed called directly
(as they called it before the seam); and a recording comm that sees every bucket reduction, ZeRO-1 gather and
pipeline transfer, so code that goes around the seam fails here."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalith.core import ParallelConfig, ParallelDims, build_loss_fn, build_model_chunks
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
from megalith.core.distributed.comm import Comms, P2POp, TorchGroupComm, build_comms
from megalith.core.pipeline import PipeComm, forward_backward, unwrap
from tests.core.moe.common import moe_config
from tests.core.pipe.comm_doubles import DirectTorchComm, RecordingComm, wrap_comms
from tests.core.pipe.common import MICRO_BATCH, OPT, named, step_batches
from tests.core.pipe.model import tiny_config
from tests.harness import run_distributed

# ---- the torch comm's operations --------------------------------------------------------------------------


def _rank_data(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 + rank))


def _p2p_members(world: int) -> list[int]:
    return list(range(0, world, 2)) if world >= 4 else list(range(world))


def _ops_worker(rank, world):
    # At world 4 the p2p group is the even ranks, so group ranks differ from global ones.
    members = _p2p_members(world)
    sub_group = dist.new_group(members)
    out = {}
    comm = TorchGroupComm(dist.group.WORLD)
    n = 6 * world
    inputs = [_rank_data(r, n) for r in range(world)]
    for op, async_op in (("sum", True), ("avg", False), ("avg", True)):
        t = inputs[rank].clone()
        handle = comm.all_reduce(t, op, async_op=async_op)
        handle.wait()
        out[f"all_reduce_{op}_{async_op}"] = t
        scattered = torch.empty(n // world)
        comm.reduce_scatter(scattered, inputs[rank].clone(), op, async_op=async_op).wait()
        out[f"reduce_scatter_{op}_{async_op}"] = scattered
    gathered = torch.empty(world * 5)
    comm.all_gather(gathered, inputs[rank][:5].clone(), async_op=False)
    out["all_gather"] = gathered
    if rank in members:
        sub = TorchGroupComm(sub_group)
        peer = (sub.rank + 1) % sub.size
        received = torch.empty(4)
        handles = sub.batch_p2p([P2POp("send", inputs[rank][:4].clone(), peer, 7), P2POp("recv", received, peer, 7)])
        for h in handles:
            h.wait()
        out["p2p"] = (sub.rank, sub.size, received)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_torch_group_comm_operations(world):
    results = run_distributed(_ops_worker, world, timeout=120)
    n = 6 * world
    inputs = [_rank_data(r, n) for r in range(world)]
    total = torch.stack(inputs).sum(0)
    for rank, out in enumerate(results):
        block = slice(rank * 6, (rank + 1) * 6)
        for async_op in (True, False):
            if f"all_reduce_avg_{async_op}" in out:
                torch.testing.assert_close(out[f"all_reduce_avg_{async_op}"], total / world)
                torch.testing.assert_close(out[f"reduce_scatter_avg_{async_op}"], total[block] / world)
        torch.testing.assert_close(out["all_reduce_sum_True"], total)
        torch.testing.assert_close(out["reduce_scatter_sum_True"], total[block])
        torch.testing.assert_close(out["all_gather"], torch.cat([x[:5] for x in inputs]))
        members = _p2p_members(world)
        if rank in members:
            group_rank, size, received = out["p2p"]
            assert (group_rank, size) == (members.index(rank), len(members))
            torch.testing.assert_close(received, inputs[members[(group_rank - 1) % size]][:4])


def test_seam_argument_errors():
    alone = TorchGroupComm(None)  # one process, no torch.distributed: the one-rank identities
    assert (alone.size, alone.rank) == (1, 0)
    out = torch.empty(3)
    alone.all_gather(out, torch.arange(3.0)).wait()
    assert torch.equal(out, torch.arange(3.0))
    with pytest.raises(ValueError, match=r"op must be one of sum, avg, got 'max'"):
        alone.all_reduce(torch.ones(2), "max")
    with pytest.raises(ValueError, match=r"P2POp.kind must be 'send' or 'recv', got 'isend'"):
        P2POp("isend", torch.ones(1), 0)
    with pytest.raises(ValueError, match=r"no peer"):
        alone.batch_p2p([P2POp("send", torch.ones(1), 0)])
    dims = ParallelDims.single_process()
    with pytest.raises(ValueError, match=r"parallel.comm must be one of torch, nccl, got 'mpi'"):
        build_comms(dims, "mpi")
    with pytest.raises(ValueError, match=r"parallel.comm='nccl' needs a CUDA device, but training runs on cpu"):
        build_comms(dims, "nccl", device="cpu")
    comms = build_comms(dims)
    assert comms.kind == "torch" and comms.dense is comms.expert  # one comm for a group both roles share
    comms.close()
    comms.close()  # closing twice is harmless


def _mismatch_worker(rank, world):
    dims = ParallelDims(dp=world)
    alone = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    other = Comms("torch", *(TorchGroupComm(alone[rank]) for _ in range(3)))
    (chunk,) = build_model_chunks(tiny_config(num_layers=1), dims, parallel=ParallelConfig())
    with pytest.raises(ValueError, match=r"comms has 1 ranks for the dense gradients, the topology 2"):
        DistributedDataParallel(chunk, dims, DDPConfig(), comms=other)
    with pytest.raises(ValueError, match=r"PipeComm: comm has 2 ranks, the pipeline 1"):
        PipeComm(dims, TorchGroupComm(dist.group.WORLD))


def test_comms_must_match_the_topology():
    run_distributed(_mismatch_worker, 2, timeout=60)


# ---- DDP, ZeRO-1 and pp through the seam ------------------------------------------------------------------


def _train(cfg, dims, parallel, comms, *, zero, steps, m, seq):
    ddp = DDPConfig(bucket_size=300, use_distributed_optimizer=zero)
    chunks = [
        DistributedDataParallel(c, dims, ddp, comms=comms)
        for c in build_model_chunks(cfg, dims, parallel=parallel, seed=3)
    ]
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, clip_grad=0.5, fused=False))
    losses = []
    for step in range(steps):
        opt.zero_grad()
        batches = step_batches(cfg, step, m, dims.data_parallel_size)[dims.data_rank]
        loss_fn = build_loss_fn(unwrap(chunks[-1]))
        shape = (MICRO_BATCH, seq, cfg.hidden_size)
        kwargs = dict(loss_fn=loss_fn, dtype=torch.float32, hidden_shape=shape, comms=comms)
        losses.append(forward_backward(chunks, batches, dims, **kwargs))
        opt.step()
    return losses, named(chunks), chunks


def _seam_worker(rank, world, layout: dict, moe: bool, zero: bool, steps: int, m: int):
    parallel = ParallelConfig(**layout)
    dims = ParallelDims.from_config(parallel, world)
    cfg = moe_config() if moe else tiny_config(num_layers=4, tie_embeddings=dims.pp > 1)
    seq = cfg.max_seq_len
    torch_comms = build_comms(dims, "torch")
    direct = wrap_comms(torch_comms, lambda comm, role: DirectTorchComm(comm.group))
    log: list = []
    recording = wrap_comms(torch_comms, lambda comm, role: RecordingComm(comm, role, log))
    runs = {
        "direct": _train(cfg, dims, parallel, direct, zero=zero, steps=steps, m=m, seq=seq),
        "seam": _train(cfg, dims, parallel, recording, zero=zero, steps=steps, m=m, seq=seq),
        "default": _train(cfg, dims, parallel, None, zero=zero, steps=steps, m=m, seq=seq),
    }
    recording.close()
    chunks = runs["seam"][2]
    buckets = [
        ("expert" if b.expert and recording.expert is not recording.dense else "dense", b.numel)
        for c in chunks
        for b in c.buckets
        if b.size > 1
    ]
    stages = [(chunk * dims.pp + dims.pp_rank, dims.pp * len(chunks)) for chunk in range(len(chunks))]
    return {
        "results": {k: (v[0], v[1]) for k, v in runs.items()},
        "log": log,
        "buckets": buckets,
        "stages": stages,
        "closed": all(getattr(recording, r).closed for r in ("dense", "expert", "pp")),
        "hidden": MICRO_BATCH * seq * cfg.hidden_size,
        "distinct_expert": recording.expert is not recording.dense,
    }


LAYOUTS = {
    "dp2": (2, dict(), False, False),
    "dp2-zero1": (2, dict(), False, True),
    "pp2": (2, dict(pp=2), False, False),
    "dp4-zero1": (4, dict(), False, True),
    "pp2-dp2-interleaved-zero1": (4, dict(pp=2, virtual_stages=2), False, True),
    "ep2-dp2-moe-zero1": (4, dict(ep=2), True, True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_seam_is_bit_identical_and_carries_every_transfer(name):
    world, layout, moe, zero = LAYOUTS[name]
    steps, m = 2, 4
    results = run_distributed(_seam_worker, world, layout, moe, zero, steps, m, timeout=300)
    for rank, out in enumerate(results):
        direct_losses, direct_params = out["results"]["direct"]
        for run in ("seam", "default"):
            losses, params = out["results"][run]
            assert losses == direct_losses, (rank, run)
            assert params.keys() == direct_params.keys()
            for key, value in params.items():
                assert torch.equal(value, direct_params[key]), (rank, run, key)
        assert out["closed"]
        # Every bucket of more than one rank is reduced once per step (a reduce-scatter under ZeRO-1) and, under
        # ZeRO-1, its parameters gathered once per step, through the comm of its kind.
        log = out["log"]
        reduce = "reduce_scatter" if zero else "all_reduce"
        expected = sorted(out["buckets"] * steps)
        assert sorted((role, n) for role, kind, n in log if kind == reduce) == expected, rank
        gathers = sorted((role, n) for role, kind, n in log if kind == "all_gather")
        assert gathers == (expected if zero else []), rank
        assert not any(kind == ("all_reduce" if zero else "reduce_scatter") for _, kind, _ in log)
        assert bool(expected) == (world // layout.get("pp", 1) > 1), "every layout with dp > 1 reduces something"
        if moe:
            assert out["distinct_expert"] and any(role == "expert" for role, _ in out["buckets"])
        # Each virtual stage receives its input and sends its output-gradient unless it is the first stage, and
        # sends its output and receives the incoming gradient unless it is the last: m of each per step.
        transfers = {"send": 0, "recv": 0}
        for stage, num_stages in out["stages"]:
            transfers["send"] += m * ((stage > 0) + (stage < num_stages - 1)) * steps
            transfers["recv"] += m * ((stage > 0) + (stage < num_stages - 1)) * steps
        for kind in ("send", "recv"):
            sizes = [n for role, k, n in log if k == kind]
            assert len(sizes) == transfers[kind], (rank, kind)
            assert all(n == out["hidden"] for n in sizes)
            assert all(role == "pp" for role, k, _ in log if k == kind)
