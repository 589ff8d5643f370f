"""Step time with communication overlap on and off, on a CPU gloo world with a simulated network.

Both tables run the real code (megalith.core.pipeline.forward_backward and megalith.core.distributed.AdamW) with
layers of fixed cost (a sleep of t_f / L per layer in forward and twice that in backward, so the machine's load does
not distort the result) and a simulated link in front of the real gloo transfer: each transfer occupies the link
for `delay` ms after it is posted (one at a time, in posting order) and its wait() returns no earlier than that.
gloo itself moves these small tensors in well under a millisecond, so the delay stands for a slow network.

- Table 1, ZeRO-1 parameter all-gather (`DDPConfig.overlap_param_gather`), dp = 2: one bucket per layer (the last
  with the output layer) and one for the embedding. Off, the step all-gathers every bucket before returning; on,
  the next forward waits for each just before its layer.
- Table 2, pipeline transfers (`overlap_p2p`, `ParallelConfig.overlap_p2p_comm`), pp = 2 and 4, 1F1B: off, each
  receive is posted when its pass starts; on, a pass ahead, while the rank computes the pass in between.

"hidden" is the share of the communication time the overlap removes from the step: (off - on) / (off - base), base
the mean of off and on at delay 0 (no communication to hide; their difference shows the noise). ZeRO-1 steps run
back to back and are timed together (their mean, best of two runs); pipeline steps are timed one by one between
barriers (the best of `steps` in each of two runs).

Run: .venv/bin/python benchmarks/overlap.py [--tf-ms 40] [--steps 5] [--delays-ms 0 5 10 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.pipeline import Sleep
from megalith.core import ParallelDims
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
from megalith.core.distributed import comm as comm_module
from megalith.core.pipeline import forward_backward, split_layers
from tests.harness import run_distributed

H, S, V = 8, 4, 16
LAYER_PARAMS = 4096  # elements per layer: with bucket_size = LAYER_PARAMS, one bucket per layer


class FixedCostLayer(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.full((LAYER_PARAMS,), 1.0))

    def forward(self, x):
        return Sleep.apply(x * self.weight[:H], self.seconds)


class FixedCostModel(nn.Module):
    """One pipeline stage of fixed-cost layers: token ids in on the first stage, logits out on the last."""

    def __init__(self, seconds, *, layer_ids, first_stage, last_stage):
        super().__init__()
        self.embed = nn.Embedding(V, H) if first_stage else None
        self.layers = nn.ModuleDict({str(i): FixedCostLayer(seconds) for i in layer_ids})
        self.output = nn.Linear(H, V) if last_stage else None

    def forward(self, x):
        h = x if x.is_floating_point() else self.embed(x)
        for layer in self.layers.values():
            h = layer(h)
        return h if self.output is None else self.output(h)


def _loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(labels.shape)


def _batches(m: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, V, (1, S), generator=gen), "labels": torch.randint(0, V, (1, S), generator=gen)}
        for _ in range(m)
    ]


class Link:
    """A simulated network link: transfers take `delay` s each, one after another, from the moment they are posted."""

    def __init__(self, delay: float) -> None:
        self.delay, self.free_at = delay, 0.0

    def occupy(self) -> float:
        """Books the link for one transfer posted now; returns when that transfer completes."""
        self.free_at = max(time.perf_counter(), self.free_at) + self.delay
        return self.free_at


class SlowWork:
    """A work handle whose wait() returns no earlier than the simulated transfer's completion."""

    def __init__(self, work, done_at: float) -> None:
        self.work, self.done_at = work, done_at

    def wait(self) -> bool:
        self.work.wait()
        time.sleep(max(0.0, self.done_at - time.perf_counter()))
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed() and time.perf_counter() >= self.done_at


def _slow_all_gather(link: Link, real):
    def gather(output, shard, group, async_op=False):
        work = real(output, shard, group, async_op=async_op)
        done_at = link.occupy()
        if async_op:
            return SlowWork(work, done_at)
        time.sleep(max(0.0, done_at - time.perf_counter()))
        return work

    return gather


def _slow_p2p(link: Link):
    real = dist.batch_isend_irecv

    def batch(ops):
        works = real(ops)
        # Receives pay the delay (a transfer starts once both sides have posted; the receive is posted last).
        return [SlowWork(w, link.occupy()) if op.op is dist.irecv else w for w, op in zip(works, ops, strict=True)]

    return batch


def _zero_step(opt, ddp, batches, dims) -> None:
    opt.zero_grad()
    forward_backward([ddp], batches, dims, loss_fn=_loss, hidden_shape=(1, S, H), dtype=torch.float32)
    opt.step()


def _zero_worker(rank, world, num_layers, m, tf, delay, steps):
    dims = ParallelDims(dp=world)
    batches = _batches(m)
    real = comm_module.all_gather_into
    out = {}
    try:
        for overlap in (False, True, False, True):  # alternated, so drifting machine load hits both alike
            cfg = DDPConfig(bucket_size=LAYER_PARAMS, use_distributed_optimizer=True, overlap_param_gather=overlap)
            model = FixedCostModel(tf / num_layers, layer_ids=range(num_layers), first_stage=True, last_stage=True)
            ddp = DistributedDataParallel(model, dims, cfg)
            opt = AdamW([ddp], dims, OptimizerConfig(lr=1e-3, fused=False))
            comm_module.all_gather_into = _slow_all_gather(Link(delay), real)
            dist.barrier()
            _zero_step(opt, ddp, batches, dims)  # warm-up: its gathers are the first timed step's to wait for
            # Steps back to back (the gradient collectives keep the ranks in step): a pause between them would give
            # the in-flight gathers time that a training loop does not have.
            start = time.perf_counter()
            for _ in range(steps):
                _zero_step(opt, ddp, batches, dims)
            per_step = (time.perf_counter() - start) / steps
            opt.finish_param_gather()
            out[overlap] = min(out.get(overlap, float("inf")), per_step)
    finally:
        comm_module.all_gather_into = real
    return out


def _pp_worker(rank, world, m, tf, delay, steps):
    dims = ParallelDims(pp=world)
    layers = split_layers(world, world)
    model = FixedCostModel(tf, layer_ids=layers[dims.pp_rank], first_stage=dims.pp_rank == 0,
                           last_stage=dims.pp_rank == world - 1)  # fmt: skip
    chunks = [DistributedDataParallel(model, dims)]
    batches = _batches(m)
    real = dist.batch_isend_irecv
    out = {}
    try:
        for overlap in (False, True, False, True):
            dist.batch_isend_irecv = _slow_p2p(Link(delay))
            times = []
            for _ in range(steps + 1):
                chunks[0].zero_grad_buffer()
                dist.barrier()
                start = time.perf_counter()
                forward_backward(chunks, batches, dims, loss_fn=_loss, hidden_shape=(1, S, H), dtype=torch.float32,
                                 overlap_p2p=overlap)  # fmt: skip
                dist.barrier()
                times.append(time.perf_counter() - start)
            out[overlap] = min(out.get(overlap, float("inf")), min(times[1:]))
    finally:
        dist.batch_isend_irecv = real
    return out


def _row(name: str, delay: float, off: float, on: float, base: float) -> str:
    comm = off - base
    hidden = f"{(off - on) / comm:>8.0%}" if delay > 0 and comm > 1e-3 else f"{'-':>8}"
    return f"{name:<22}{delay * 1e3:>9.0f}{off * 1e3:>10.1f}{on * 1e3:>10.1f}{(off - on) * 1e3:>10.1f}{hidden}"


HEADER = f"{'layout':<22}{'delay ms':>9}{'off ms':>10}{'on ms':>10}{'saved ms':>10}{'hidden':>8}"


def zero_table(tf: float, steps: int, delays: list[float]) -> None:
    num_layers, m = 4, 2
    print(f"ZeRO-1 parameter all-gather, dp 2, {num_layers} layers, {num_layers + 1} buckets (the embedding, each "
          f"layer), {m} micro-batches, forward {tf * 1e3:.0f} ms per micro-batch; delay per bucket gather")  # fmt: skip
    print(HEADER)
    base = None
    for delay in delays:
        times = max(run_distributed(_zero_worker, 2, num_layers, m, tf, delay, steps, timeout=600),
                    key=lambda t: t[False])  # fmt: skip
        base = (times[False] + times[True]) / 2 if delay == 0 else base
        print(_row("dp2 ZeRO-1", delay, times[False], times[True], base))


def pp_table(tf: float, steps: int, delays: list[float]) -> None:
    m = 8
    print(f"\nPipeline transfers, 1F1B, {m} micro-batches, forward {tf * 1e3:.0f} ms and backward "
          f"{2 * tf * 1e3:.0f} ms per stage and micro-batch; delay per transfer")  # fmt: skip
    print(HEADER)
    for pp in (2, 4):
        base = None
        for delay in delays:
            times = max(run_distributed(_pp_worker, pp, m, tf, delay, steps, timeout=600), key=lambda t: t[False])
            base = (times[False] + times[True]) / 2 if delay == 0 else base
            print(_row(f"pp{pp}", delay, times[False], times[True], base))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-ms", type=float, default=40.0, help="forward cost per rank and micro-batch (ms)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and run")
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0, 5, 10, 20], help="simulated delays (ms)")
    args = parser.parse_args()
    delays = [d / 1e3 for d in args.delays_ms]
    if delays[0] != 0:
        delays = [0.0, *delays]
    zero_table(args.tf_ms / 1e3, args.steps, delays)
    pp_table(args.tf_ms / 1e3, args.steps, delays)


if __name__ == "__main__":
    main()
