"""Overlapped pipeline transfers (`forward_backward(overlap_p2p=True)`): the same losses, gradients and weights as
the plain executor, and the order of posts, waits and passes that overlaps them with compute."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalith.core import ParallelConfig, ParallelDims
from megalith.core.distributed import AdamW, DDPConfig, OptimizerConfig
from megalith.core.pipeline import forward_backward, schedules
from tests.core.pipe.common import MICRO_BATCH, OPT, build, loss_fn, named, step_batches
from tests.core.pipe.model import tiny_config
from tests.harness import run_distributed


def _train(rank, world, *, pp, vp, m, overlap, zero=False, steps=2, tied=False):
    """`steps` AdamW steps; each step's loss and gradients, and the final weights."""
    cfg = tiny_config(num_layers=4, tie_embeddings=tied)
    dims = ParallelDims(pp=pp, dp=world // pp)
    chunks = build(cfg, dims, vp=vp, ddp_config=DDPConfig(bucket_size=300, use_distributed_optimizer=zero))
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, fused=False))
    losses, grads = [], []
    for step in range(steps):
        opt.zero_grad()
        batches = step_batches(cfg, step, m, dims.dp)[dims.dp_rank]
        losses.append(forward_backward(chunks, batches, dims, loss_fn=loss_fn(chunks), dtype=torch.float32,
                                       hidden_shape=(MICRO_BATCH, cfg.max_seq_len, cfg.hidden_size),
                                       overlap_p2p=overlap))  # fmt: skip
        grads.append(named(chunks, grads=True))
        opt.step()
    return {"losses": losses, "grads": grads, "params": named(chunks)}


LAYOUTS = {
    "pp2": dict(world=2, pp=2, vp=1, m=4, tied=True),
    "pp4": dict(world=4, pp=4, vp=1, m=5),
    "pp2-interleaved": dict(world=2, pp=2, vp=2, m=4),
    "pp2xdp2-zero1": dict(world=4, pp=2, vp=1, m=3, zero=True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_overlapped_transfers_give_the_plain_results(name):
    layout = dict(LAYOUTS[name])
    world = layout.pop("world")
    plain = run_distributed(_train, world, overlap=False, **layout, timeout=180)
    over = run_distributed(_train, world, overlap=True, **layout, timeout=180)
    for rank, (a, b) in enumerate(zip(plain, over, strict=True)):
        assert a["losses"] == b["losses"], f"rank {rank}"
        for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"], strict=True)):
            assert all(torch.equal(v, gb[k]) for k, v in ga.items()), f"rank {rank} step {step}: gradients differ"
        assert all(torch.equal(v, b["params"][k]) for k, v in a["params"].items()), f"rank {rank}: weights differ"


def _order_worker(rank, world, overlap: bool, vp: int, m: int):
    """Records, on this rank: batches posted (their sends' and receives' tags), receive waits, compute passes."""
    cfg = tiny_config(num_layers=4)
    dims = ParallelDims(pp=world)
    chunks = build(cfg, dims, vp=vp)
    events: list[tuple] = []
    real_batch, real_backward = dist.batch_isend_irecv, schedules._backward
    current: list[tuple] = []

    class Recorded:
        def __init__(self, work, tag):
            self.work, self.tag = work, tag

        def wait(self):
            events.append(("wait", self.tag))
            return self.work.wait()

        def is_completed(self):
            return self.work.is_completed()

    def batch(ops):
        sends = [op.tag for op in ops if op.op is dist.isend]
        recvs = [op.tag for op in ops if op.op is dist.irecv]
        events.append(("post", sends, recvs))
        works = real_batch(ops)
        return [Recorded(w, op.tag) if op.op is dist.irecv else w for w, op in zip(works, ops, strict=True)]

    def backward(*args):
        events.append(("compute", *current[-1]))
        return real_backward(*args)

    for chunk in chunks:

        def forward(*args, _real=chunk.module.forward, **kwargs):
            events.append(("compute", *current[-1]))
            return _real(*args, **kwargs)

        chunk.module.forward = forward
    real_f, real_b = schedules._Executor.forward, schedules._Executor.backward

    def run_f(self, chunk, mb):
        current.append(("F", self._stage(chunk)[0], mb))
        return real_f(self, chunk, mb)

    def run_b(self, chunk, mb, sync_grads):
        current.append(("B", self._stage(chunk)[0], mb))
        return real_b(self, chunk, mb, sync_grads)

    dist.batch_isend_irecv, schedules._backward = batch, backward
    schedules._Executor.forward, schedules._Executor.backward = run_f, run_b
    try:
        batches = step_batches(cfg, 0, m, 1)[0]
        forward_backward(chunks, batches, dims, loss_fn=loss_fn(chunks), dtype=torch.float32,
                         hidden_shape=(MICRO_BATCH, cfg.max_seq_len, cfg.hidden_size), overlap_p2p=overlap)  # fmt: skip
    finally:
        dist.batch_isend_irecv, schedules._backward = real_batch, real_backward
        schedules._Executor.forward, schedules._Executor.backward = real_f, real_b
    return events, len(chunks) * world


def _pass_of(tag: int, num_stages: int) -> tuple[str, int, int]:
    """The (kind, receiving stage, micro-batch) a transfer's tag names (`_Executor._tag`)."""
    backward, rest = tag % 2, tag // 2
    return ("B" if backward else "F", rest % num_stages, rest // num_stages)


def _check_order(events, num_stages):
    computes = [i for i, e in enumerate(events) if e[0] == "compute"]
    start = {e[1:]: i for i, e in enumerate(events) if e[0] == "compute"}  # pass -> its compute's index
    posted, hidden = {}, 0
    for i, event in enumerate(events):
        if event[0] == "post":
            for tag in event[2]:
                posted[tag] = i
            # A pass's outputs are posted before the next pass computes (right after it, when overlapping).
            for tag in event[1]:
                kind, stage, mb = _pass_of(tag, num_stages)
                producer = ("F", stage - 1, mb) if kind == "F" else ("B", stage + 1, mb)
                later = [c for c in computes if c > start[producer]]
                assert not later or i < later[0], f"the send of {producer} waited past the next pass"
        elif event[0] == "wait":
            tag = event[1]
            needed_by = _pass_of(tag, num_stages)
            assert posted[tag] < i < start[needed_by], f"receive for {needed_by} waited out of order"
            # Waited right before use: no other pass computes between the wait and its pass.
            assert not [c for c in computes if i < c < start[needed_by]], f"{needed_by} waited too early"
            if any(posted[tag] < c < i for c in computes):
                hidden += 1
    return hidden, len(posted)


@pytest.mark.parametrize(("world", "vp", "m"), [(2, 1, 4), (4, 1, 6), (2, 2, 4)])
def test_receives_are_posted_a_pass_ahead_and_waited_right_before_their_pass(world, vp, m):
    for overlap in (False, True):
        for rank, (events, num_stages) in enumerate(run_distributed(_order_worker, world, overlap, vp, m)):
            hidden, receives = _check_order(events, num_stages)
            assert receives >= m, f"rank {rank}: the test needs receives"
            if overlap:  # most receives are in flight while another pass computes
                assert hidden >= receives // 2, f"rank {rank}: only {hidden} of {receives} receives overlap"
            else:
                assert hidden == 0, f"rank {rank}: the plain executor posts each receive right before its wait"


def test_overlap_p2p_comm_is_refused_on_nccl():
    with pytest.raises(ValueError, match="overlap_p2p_comm is implemented for the gloo backend and comm=torch only"):
        ParallelConfig(pp=2, backend="nccl", overlap_p2p_comm=True)
    with pytest.raises(ValueError, match="overlap_p2p_comm is implemented for the gloo backend and comm=torch only"):
        ParallelConfig(pp=2, backend="gloo", device="cuda", comm="nccl", overlap_p2p_comm=True)
    assert ParallelConfig(pp=2, backend="gloo", overlap_p2p_comm=True).overlap_p2p_comm
