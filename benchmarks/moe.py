"""Mixture-of-experts speed and memory: tables, not tests.

    .venv/bin/python benchmarks/moe.py            # CPU (gloo): tables 1 and 2
    .venv/bin/python benchmarks/moe.py --cuda     # also table 3 on a GPU

Table 1 times one MoE layer (router, dispatch, experts, combine) forward + backward on each rank of a gloo world
with expert parallelism ep = 1, 2, 4 (the ep ranks read different tokens, as data-parallel ranks do), against a
dense SwiGLU MLP with the same active parameters (inner size top_k * expert size) in the same run. The share of
the time outside the router and the experts' GEMMs (permutation, token counts, all-to-all, unpermutation,
weighting) is the dispatcher's: the experts are timed again alone on the very token groups the dispatch gave
them, and the router alone, and both are subtracted. Medians over the repeats, slowest rank.
Table 2 measures per-rank parameter and AdamW state bytes of a small MoE model at several layouts against the
formula: a rank holds the dense parameters D and its 1/ep of the routed experts X; the fp32 optimizer keeps two
moments (8 bytes per parameter), for all it holds, or, with ZeRO-1, for its 1/(ep * dp) share of D + X (up to
bucket padding).
Table 3 (GPU): torch._grouped_mm against one matmul per expert at Mixtral-like shapes, and tiny-moe training
tokens/s on one device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalith.core import ModelConfig, ParallelConfig, ParallelDims, build_model_chunks, get_preset
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
from megalith.core.models.mlp import MLP
from megalith.core.moe import MoE
from megalith.core.moe.grouped_gemm import grouped_mm, looped_mm
from megalith.core.placement import named_placements
from tests.harness import run_distributed

H, EXPERTS, TOP_K, EXPERT_FFN, TOKENS = 256, 8, 2, 512, 1024


def _layer_config() -> ModelConfig:
    return ModelConfig(family="mixtral", vocab_size=64, hidden_size=H, num_layers=1, num_attention_heads=4,
                       ffn_hidden_size=TOP_K * EXPERT_FFN, max_seq_len=256, norm="rmsnorm", activation="swiglu",
                       position_embedding="rope", bias=False, num_experts=EXPERTS, moe_top_k=TOP_K,
                       moe_ffn_hidden_size=EXPERT_FFN, moe_aux_loss_coeff=0.01)  # fmt: skip


def _best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls after two warm-ups (the least disturbed by a busy machine)."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def _layer_worker(rank, world, ep: int, repeats: int):
    torch.set_num_threads(1)
    config = _layer_config()
    dims = ParallelDims.from_config(ParallelConfig(ep=ep), world) if world > 1 else None
    (model,) = build_model_chunks(config, dims, parallel=ParallelConfig(ep=ep) if dims else None)
    moe: MoE = model.layers["0"].mlp
    dense = MLP(config).float()
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(TOKENS // 128, 128, H, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    grad = torch.randn_like(x)
    groups = []
    original = moe.experts.forward

    def record(x_NH, counts):  # the token groups the dispatch hands the experts
        groups.append((x_NH.shape[0], counts.clone()))
        return original(x_NH, counts)

    def layer_step(module):
        out = module(x)
        out.backward(grad)
        moe.take_aux_loss()
        x.grad = None

    moe.experts.forward = record
    layer_step(moe)
    moe.experts.forward = original
    (rows, counts) = groups[-1]
    xe = torch.randn(rows, H, requires_grad=True)
    ye = torch.randn(rows, H)
    xr = x.detach().reshape(-1, H).requires_grad_()

    def experts_step():
        moe.experts(xe, counts).backward(ye)

    def router_step():
        moe.router(xr).weights_Tk.sum().backward()

    times = {
        "moe": _best_time(lambda: layer_step(moe), repeats),
        "dense": _best_time(lambda: layer_step(dense), repeats),
        "experts": _best_time(experts_step, repeats),
        "router": _best_time(router_step, repeats),
    }
    moe.stats = None
    return times


def table_layer_times(repeats: int) -> None:
    machine = f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    print(f"\nTable 1: one layer forward + backward, {TOKENS} tokens per rank, H={H}, {EXPERTS} experts, top-{TOP_K}, "
          f"expert inner size {EXPERT_FFN} (CPU, gloo, 1 thread per rank; {machine})")  # fmt: skip
    print(f"{'layout':<14}{'dense MLP ms':>14}{'MoE ms':>10}{'MoE/dense':>11}{'experts ms':>12}{'router ms':>11}"
          f"{'dispatch share':>16}")  # fmt: skip
    for ep in (1, 2, 4):
        results = (
            run_distributed(_layer_worker, ep, ep, repeats, timeout=900)
            if ep > 1
            else [_layer_worker(0, 1, 1, repeats)]
        )
        slowest = {k: max(r[k] for r in results) for k in results[0]}
        share = 1 - (slowest["experts"] + slowest["router"]) / slowest["moe"]
        print(f"{'ep ' + str(ep):<14}{slowest['dense'] * 1e3:>14.2f}{slowest['moe'] * 1e3:>10.2f}"
              f"{slowest['moe'] / slowest['dense']:>10.2f}x{slowest['experts'] * 1e3:>12.2f}"
              f"{slowest['router'] * 1e3:>11.2f}{share:>15.1%}")  # fmt: skip


def _memory_worker(rank, world, ep: int, zero: bool):
    config = get_preset("tiny-moe", num_layers=4)
    parallel = ParallelConfig(ep=ep)
    dims = ParallelDims.from_config(parallel, world) if world > 1 else ParallelDims.single_process()
    chunks = [DistributedDataParallel(c, dims, DDPConfig(bucket_size=None, use_distributed_optimizer=zero))
              for c in build_model_chunks(config, dims if world > 1 else None, parallel=parallel)]  # fmt: skip
    opt = AdamW(chunks, dims, OptimizerConfig(fused=False))
    dense = experts = 0
    for chunk in chunks:
        for _, p, where in named_placements(chunk.module):
            if p.requires_grad:
                if where.experts is not None:
                    experts += p.numel()
                else:
                    dense += p.numel()
    return dense, experts, opt.state_bytes()


def table_memory() -> None:
    print("\nTable 2: per-rank parameters and AdamW state (tiny-moe, 4 layers, fp32; D dense, X routed experts)")
    print(f"{'layout':<22}{'dense D':>10}{'experts/rank':>14}{'param MB':>10}{'optim MB':>10}{'formula MB':>12}"
          f"{'ratio':>8}")  # fmt: skip
    for world, ep, zero in ((1, 1, False), (2, 2, False), (4, 4, False), (4, 2, True), (4, 4, True)):
        runs = (
            run_distributed(_memory_worker, world, ep, zero, timeout=600)
            if world > 1
            else [_memory_worker(0, 1, 1, zero)]
        )
        dense, experts, state = max(runs, key=lambda r: r[2])
        total_experts = experts * ep
        held = dense + experts
        formula = 8 * ((dense + total_experts) / world if zero else held)
        name = f"ep{ep} x dp{world // ep}" + (" ZeRO-1" if zero else "")
        print(f"{name:<22}{dense:>10,}{experts:>14,}{4 * held / 2**20:>10.3f}{state / 2**20:>10.3f}"
              f"{formula / 2**20:>12.3f}{state / formula:>7.3f}x")  # fmt: skip


def table_gpu(repeats: int) -> None:
    device, dtype = "cuda", torch.bfloat16
    print(f"\nTable 3: GPU ({torch.cuda.get_device_name()}), bf16")
    print(f"{'case':<48}{'grouped ms':>12}{'loop ms':>10}{'speed-up':>10}")
    for experts, h, f, tokens in ((8, 4096, 14336, 8192), (128, 2048, 768, 16384)):
        counts = torch.full((experts,), tokens * 2 // experts, dtype=torch.int64, device=device)
        x = torch.randn(int(counts.sum()), h, device=device, dtype=dtype)
        w = torch.randn(experts, f, h, device=device, dtype=dtype) * 0.02

        def run(fn, x=x, w=w, counts=counts):
            def step():
                fn(x, w.transpose(1, 2), counts)
                torch.cuda.synchronize()

            return _best_time(step, repeats)

        grouped = run(lambda a, b, c: grouped_mm(a, b, c, "grouped_mm"))
        loop = run(looped_mm)
        print(f"{f'E={experts} H={h} F={f} slots={int(counts.sum())}':<48}{grouped * 1e3:>12.3f}{loop * 1e3:>10.3f}"
              f"{loop / grouped:>9.2f}x")  # fmt: skip
    config = get_preset("tiny-moe")
    (model,) = build_model_chunks(config, device=device, dtype=dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (16, config.max_seq_len), device=device)

    def train_step():
        from megalith.core import build_loss_fn
        from megalith.core.loss import take_aux_losses

        loss = build_loss_fn(model)(model(ids), ids).mean() + take_aux_losses(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()

    seconds = _best_time(train_step, repeats)
    print(f"tiny-moe training: {ids.numel() / seconds:,.0f} tokens/s ({ids.shape[0]} x {ids.shape[1]} tokens per step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda", action="store_true", help="also run table 3 on the GPU")
    args = parser.parse_args()
    table_layer_times(args.repeats)
    table_memory()
    if args.cuda:
        table_gpu(args.repeats)


if __name__ == "__main__":
    main()
