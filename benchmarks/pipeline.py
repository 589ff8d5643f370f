"""Pipeline bubble of the 1F1B and interleaved schedules against theory, and ZeRO-1 memory per rank.

Table 1 runs the real schedules (megalith.core.pipeline.forward_backward) on a CPU gloo world whose layers
have a fixed cost (a sleep of t_f in forward and 2 t_f in backward, split evenly over a rank's chunks, so the
machine's load does not distort it). Ideal step time is m * 3 t_f per rank; the measured bubble fraction is
1 - ideal / measured, to compare with (p - 1) / (m + p - 1) for 1F1B and (p - 1) / (v m + p - 1) interleaved.
Table 2 measures the optimizer-state tensors of megalith.core.distributed.AdamW per rank with and without the
distributed optimizer, for bf16 parameters and fp32 gradients (Megatron's 18 -> 6 + 12/d bytes per parameter).

Run: .venv/bin/python benchmarks/pipeline.py [--tf-ms 60] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalith.core import ParallelDims
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel
from megalith.core.pipeline import forward_backward, split_layers
from tests.harness import run_distributed

H, S, V = 8, 4, 16


class Sleep(torch.autograd.Function):
    """Identity whose forward costs `seconds` and backward twice that."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class FixedCostLayer(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.scale = nn.Parameter(torch.ones(H))

    def forward(self, x):
        return Sleep.apply(x * self.scale, self.seconds)


class FixedCostModel(nn.Module):
    """One pipeline stage of fixed-cost layers: token ids in on the first stage, logits out on the last."""

    def __init__(self, seconds, *, layer_ids, first_stage, last_stage):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): FixedCostLayer(seconds) for i in layer_ids})
        self.embed = nn.Embedding(V, H) if first_stage else None
        self.output = nn.Linear(H, V) if last_stage else None

    def forward(self, x):
        h = x if x.is_floating_point() else self.embed(x)
        for layer in self.layers.values():
            h = layer(h)
        return h if self.output is None else self.output(h)


def _loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(labels.shape)


def _bubble_worker(rank, world, vp, m, tf, steps):
    dims = ParallelDims(pp=world)
    # One layer per virtual stage; each costs tf / vp so a rank's work per micro-batch is the same for any vp.
    layers = split_layers(world * vp, world * vp)
    stages = [c * world + dims.pp_rank for c in range(vp)]
    chunks = [
        DistributedDataParallel(
            FixedCostModel(tf / vp, layer_ids=layers[s], first_stage=s == 0, last_stage=s == world * vp - 1), dims
        )
        for s in stages
    ]
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, V, (1, S), generator=gen), "labels": torch.randint(0, V, (1, S), generator=gen)}
        for _ in range(m)
    ]
    times = []
    for _ in range(steps + 1):  # the first step warms up
        for c in chunks:
            c.zero_grad_buffer()
        torch.distributed.barrier()
        start = time.perf_counter()
        forward_backward(chunks, batches, dims, loss_fn=_loss, hidden_shape=(1, S, H), dtype=torch.float32)
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def bubble_table(tf: float, steps: int) -> None:
    print(
        f"Pipeline bubble, fixed-cost stages (forward {tf * 1e3:.0f} ms, backward {2 * tf * 1e3:.0f} ms per rank"
        " and micro-batch), CPU gloo"
    )
    print(f"{'schedule':<16}{'p':>3}{'m':>4}{'step s':>9}{'ideal s':>9}{'bubble':>9}{'theory':>9}")
    for p in (2, 4):
        for m in (4, 8):
            for vp in (1, 2):
                step = max(run_distributed(_bubble_worker, p, vp, m, tf, steps, timeout=600))
                ideal = m * 3 * tf
                theory = (p - 1) / (vp * m + p - 1)
                name = "1F1B" if vp == 1 else f"interleaved v={vp}"
                print(f"{name:<16}{p:>3}{m:>4}{step:>9.3f}{ideal:>9.3f}{1 - ideal / step:>9.3f}{theory:>9.3f}")


def zero_table() -> None:
    layers = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).to(torch.bfloat16)
    n = sum(p.numel() for p in layers.parameters())
    print(f"\nMemory per rank, {n / 1e6:.2f} M bf16 parameters (bytes/param: bf16 param 2 + fp32 grad 4 + state)")
    print(f"{'optimizer':<22}{'dp':>4}{'state MB':>10}{'bytes/param':>13}{'theory':>8}{'vs plain':>10}")
    plain = None
    for dp in (1, 2, 4, 8):
        for zero in (False, True):
            if zero and dp == 1:
                continue
            # Rank 0 of a dp-rank world, described without one: only sizes are measured, nothing is reduced.
            dims = SimpleNamespace(dp=dp, dp_rank=0, dp_group=None, tp=1, tp_rank=0, pp=1, pp_rank=0, cp=1, cp_rank=0,
                                   ep=1, ep_rank=0, data_parallel_size=dp, data_rank=0,
                                   grad_reduction=lambda expert=False, dp=dp: (None, dp, 0))  # fmt: skip
            model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)]).to(torch.bfloat16)
            ddp = DistributedDataParallel(model, dims, DDPConfig(use_distributed_optimizer=zero))
            state = AdamW([ddp], dims).state_bytes()
            plain = state if dp == 1 else plain
            per_param = (2 * n + ddp.grad_buffer.numel() * 4 + state) / n
            theory = 6 + 12 / (dp if zero else 1)
            name = "AdamW (ZeRO-1)" if zero else "AdamW (replicated)"
            print(f"{name:<22}{dp:>4}{state / 2**20:>10.2f}{per_param:>13.2f}{theory:>8.1f}{plain / state:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-ms", type=float, default=60.0, help="forward cost per rank and micro-batch (ms)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (best is kept)")
    args = parser.parse_args()
    bubble_table(args.tf_ms / 1e3, args.steps)
    zero_table()


if __name__ == "__main__":
    main()
