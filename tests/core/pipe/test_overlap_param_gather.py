"""ZeRO-1's overlapped parameter all-gather (`DDPConfig.overlap_param_gather`): the same losses and weights as the
synchronous gather, and the order of issue, wait and forward that makes it so.

The overlapped runs go through `_LateGather`, which performs each asynchronous gather into a scratch buffer and
copies it into the parameters only when the handle is waited: a parameter read before its wait then holds last
step's values, so a missing wait changes the losses instead of passing unnoticed because gloo happened to be fast.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megalith.core import ParallelConfig, ParallelDims, build_model_chunks
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
from megalith.core.distributed import comm as comm_module
from megalith.core.pipeline import forward_backward
from megalith.core.precision import PrecisionConfig
from tests.core.pipe.common import MICRO_BATCH, OPT, build, loss_fn, named, step_batches
from tests.core.pipe.model import tiny_config
from tests.harness import run_distributed


class _LateGather:
    """Stands in for `all_gather_into` under TorchGroupComm.all_gather (what ZeRO-1 gathers through): asynchronous
    gathers land in the output only at wait()."""

    def __init__(self, real, events: list | None = None):
        self.real, self.events = real, events

    def __call__(self, output, shard, group, async_op=False):
        if not async_op:
            return self.real(output, shard, group)
        scratch = torch.empty_like(output)
        self.real(scratch, shard, group)
        key = output.data_ptr()
        if self.events is not None:
            self.events.append(("issue", key))
        return _LateWork(output, scratch, key, self.events)


class _LateWork:
    def __init__(self, output, scratch, key, events):
        self.output, self.scratch, self.key, self.events = output, scratch, key, events

    def wait(self) -> bool:
        if self.events is not None:
            self.events.append(("wait", self.key))
        self.output.copy_(self.scratch)
        return True


@contextlib.contextmanager
def _late_gathers(events: list | None = None):
    real = comm_module.all_gather_into
    comm_module.all_gather_into = _LateGather(real, events)
    try:
        yield
    finally:
        comm_module.all_gather_into = real


def _train(rank, world, *, pp, vp, overlap, steps, tied=False, precision="fp32", late=True, skip_waits=False):
    """`steps` ZeRO-1 steps; the losses and the final weights (read after finish_param_gather)."""
    cfg = tiny_config(num_layers=4, tie_embeddings=tied)
    dims = ParallelDims(pp=pp, dp=world // pp)
    pcfg = PrecisionConfig(dtype=precision)
    ddp = DDPConfig(bucket_size=300, use_distributed_optimizer=True, overlap_param_gather=overlap)
    if skip_waits:  # the negative control: the hooks do nothing, so the forward reads last step's weights
        DistributedDataParallel._wait_gathers_through = lambda *_: None
    chunks = build(cfg, dims, vp=vp, ddp_config=ddp, dtype=pcfg.param_dtype)
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, clip_grad=1.0, fused=False))
    losses = []
    with _late_gathers() if late else contextlib.nullcontext():
        for step in range(steps):
            opt.zero_grad()
            batches = step_batches(cfg, step, 2 * pp, dims.dp)[dims.dp_rank]
            losses.append(forward_backward(chunks, batches, dims, loss_fn=loss_fn(chunks), dtype=pcfg.param_dtype,
                                           hidden_shape=(MICRO_BATCH, cfg.max_seq_len, cfg.hidden_size)))  # fmt: skip
            opt.step()
        in_flight = sum(c._gathers_in_flight for c in chunks)
        opt.finish_param_gather()
    return {"losses": losses, "params": named(chunks), "in_flight_after_step": in_flight}


LAYOUTS = {
    "dp2": dict(world=2, pp=1, vp=1),
    "dp2xpp2": dict(world=4, pp=2, vp=1),
    "dp2xpp2-interleaved-tied": dict(world=4, pp=2, vp=2, tied=True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_overlapped_gather_gives_the_synchronous_results(name):
    layout = dict(LAYOUTS[name])
    world = layout.pop("world")
    sync = run_distributed(_train, world, overlap=False, steps=3, **layout, timeout=180)
    over = run_distributed(_train, world, overlap=True, steps=3, **layout, timeout=180)
    for rank, (a, b) in enumerate(zip(sync, over, strict=True)):
        assert b["in_flight_after_step"] > 0, "the overlapped step left no gather in flight"
        assert a["in_flight_after_step"] == 0
        assert a["losses"] == b["losses"], f"rank {rank}: losses differ"
        for key, value in a["params"].items():
            assert torch.equal(value, b["params"][key]), f"rank {rank}: {key} differs"


def test_overlapped_gather_with_bf16_parameters_and_fp32_masters():
    sync = run_distributed(_train, 2, pp=1, vp=1, overlap=False, steps=3, precision="bf16", timeout=180)
    over = run_distributed(_train, 2, pp=1, vp=1, overlap=True, steps=3, precision="bf16", timeout=180)
    for a, b in zip(sync, over, strict=True):
        assert a["losses"] == b["losses"]
        assert all(torch.equal(v, b["params"][k]) for k, v in a["params"].items())


def _moe_train(rank, world, overlap: bool):
    """ep 2 x dp 2 with ZeRO-1: dense buckets are gathered over 4 ranks, expert buckets over 2."""
    from tests.core.moe import common as moe

    parallel = ParallelConfig(ep=2)
    dims = ParallelDims.from_config(parallel, world)
    cfg = moe.moe_config()
    ddp = DDPConfig(bucket_size=400, use_distributed_optimizer=True, overlap_param_gather=overlap)
    chunks = [DistributedDataParallel(c, dims, ddp) for c in build_model_chunks(cfg, dims, parallel=parallel, seed=7)]
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, fused=False))
    groups = {b.size for c in chunks for b in c.buckets}
    losses = []
    with _late_gathers():
        for step in range(3):
            opt.zero_grad()
            batches = moe.step_batches(cfg, step, 2, dims.data_parallel_size)[dims.data_rank]
            shape = (moe.MICRO_BATCH, cfg.max_seq_len, cfg.hidden_size)
            losses.append(forward_backward(chunks, batches, dims, loss_fn=loss_fn(chunks), dtype=torch.float32,
                                           hidden_shape=shape))  # fmt: skip
            opt.step()
        opt.finish_param_gather()
    return {"losses": losses, "params": named(chunks), "group_sizes": groups}


def test_overlapped_gather_with_expert_parallel_buckets():
    sync = run_distributed(_moe_train, 4, False, timeout=300)
    over = run_distributed(_moe_train, 4, True, timeout=300)
    for rank, (a, b) in enumerate(zip(sync, over, strict=True)):
        assert b["group_sizes"] == {2, 4}, "dense and expert buckets are gathered over different groups"
        assert a["losses"] == b["losses"], f"rank {rank}"
        assert all(torch.equal(v, b["params"][k]) for k, v in a["params"].items()), f"rank {rank}"


def test_a_forward_that_does_not_wait_reads_stale_weights():
    """The negative control of the comparison above: with the waits removed the late gathers change the losses."""
    sync = run_distributed(_train, 2, pp=1, vp=1, overlap=False, steps=3, timeout=180)
    broken = run_distributed(_train, 2, pp=1, vp=1, overlap=True, steps=3, skip_waits=True, timeout=180)
    assert sync[0]["losses"][0] == broken[0]["losses"][0], "the first step has no gather to miss"
    assert sync[0]["losses"][1:] != broken[0]["losses"][1:]


def _order_worker(rank, world):
    cfg = tiny_config(num_layers=4)
    dims = ParallelDims(pp=1, dp=world)
    ddp = DDPConfig(bucket_size=300, use_distributed_optimizer=True, overlap_param_gather=True)
    chunks = build(cfg, dims, ddp_config=ddp)
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, fused=False))
    events: list[tuple[str, object]] = []
    (chunk,) = chunks
    bucket_of = {}  # parameter -> the data_ptr of its bucket's slice of the parameter buffer (the gather output)
    for p, (_, bucket) in chunk.param_index.items():
        bucket_of[p] = chunk.param_buffer[bucket.start : bucket.end].data_ptr()
    owners = {}
    for name, module in chunk.module.named_modules():
        own = [p for p in module.parameters(recurse=False) if p in chunk.param_index]
        if own:
            owners[name] = {bucket_of[p] for p in own}

            def forward(*args, _real=module.forward, _name=name, **kwargs):
                events.append(("forward", _name))
                out = _real(*args, **kwargs)
                events.append(("forward_end", _name))
                return out

            module.forward = forward
    with _late_gathers(events):
        for step in range(3):
            opt.zero_grad()
            events.append(("step", step))
            batches = step_batches(cfg, step, 2, dims.dp)[dims.dp_rank]
            forward_backward(chunks, batches, dims, loss_fn=loss_fn(chunks), dtype=torch.float32,
                             hidden_shape=(MICRO_BATCH, cfg.max_seq_len, cfg.hidden_size))  # fmt: skip
            opt.step()
    return events, owners, len(chunk.buckets)


def test_each_gather_is_issued_before_and_waited_just_before_the_forward_that_reads_it():
    for events, owners, num_buckets in run_distributed(_order_worker, 2, timeout=180):
        assert num_buckets >= 4, "the test needs several buckets"
        steps = [i for i, e in enumerate(events) if e[0] == "step"]
        for step in (1, 2):  # the steps that start with the previous step's gathers in flight
            start = steps[step]
            end = steps[step + 1] if step + 1 < len(steps) else len(events)
            issued = {key: i for i, (kind, key) in enumerate(events[:start]) if kind == "issue"}
            assert len(issued) == num_buckets
            window = events[start:end]
            waited = {key: start + i for i, (kind, key) in enumerate(window) if kind == "wait"}
            assert set(waited) == set(issued), "every gather is waited during the next step"
            first_forward = {}
            for i, (kind, name) in enumerate(window):
                if kind == "forward" and name not in first_forward:
                    first_forward[name] = start + i
            for name, buckets in owners.items():
                for key in buckets:
                    assert issued[key] < waited[key] < first_forward[name], (
                        f"step {step}: {name} ran before the gather of its bucket was waited"
                    )
            # Overlap: the later buckets are waited after the first modules' forwards already ran.
            first = min(first_forward.values())
            assert max(waited.values()) > first, "every gather was waited before the forward began"
            later = [k for k, i in waited.items() if i > first]
            assert len(later) >= num_buckets - 2, f"only {len(later)} of {num_buckets} waits overlap the forward"


def test_overlap_param_gather_needs_the_distributed_optimizer():
    with pytest.raises(ValueError, match="overlap_param_gather=true needs use_distributed_optimizer=true"):
        DDPConfig(overlap_param_gather=True)


def _compiled_worker(rank, world):
    cfg = tiny_config(num_layers=2)
    dims = ParallelDims(dp=world)
    (model,) = build_model_chunks(cfg, dims, parallel=ParallelConfig())
    model.layers["0"].compile()
    with pytest.raises(ValueError, match=r"compiled module 'layers\.0'"):
        DistributedDataParallel(model, dims, DDPConfig(use_distributed_optimizer=True, overlap_param_gather=True))
    return True


def test_overlap_param_gather_refuses_compiled_blocks():
    assert run_distributed(_compiled_worker, 2, timeout=120) == [True, True]
