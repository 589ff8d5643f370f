"""Context parallelism: memory and step time per rank against the sequence length, ring overlap, and (on a GPU)
document-masked against full attention at 32k.

Table 1 runs one forward and backward of a small Llama-style model (RoPE, GQA) over one sequence of S tokens on
a CPU gloo world of cp ranks (ring attention; cp = 1 is the plain model), with Megalith's attention kernel in
every row. It reports per rank the activations autograd saves for the backward (counted through
saved-tensor hooks, so independent of the allocator), the growth of the peak resident memory during the step,
and the step time (best of the timed steps; the slowest rank). The saved activations are linear in the rank's
S / cp tokens: the ratio column (against cp = 1 at the same S) should be near 1 / cp.
Table 2 gives the share of the ring's communication hidden behind compute, one ring step at a time on cp = 2
with the shapes of Table 1: a key/value transfer through the ring's own `RingComm.shift` alone, the block's
attention (`block_forward`) alone, and the wait left after posting the transfer and computing the block, each
the minimum over repeats (other load on the machine only ever adds time). Hidden = 1 - wait / transfer. Table 1
also lists the ranks' total wait inside a real step, which holds the lag between ranks as well.
Table 3 (only with a CUDA GPU): llama3-1b (bf16, full recomputation) at S = 32k on one GPU, causal attention over
the whole sequence against attention within packed documents, tokens/s.

Each rank runs its kernels on one thread (one core per rank, as one GPU per rank); with more ranks than cores
the ranks share them, and step times then measure total work rather than the speed-up of a cp-GPU world.

Run: .venv/bin/python benchmarks/context.py [--seqs 4096 8192 16384] [--cps 1 2 4] [--steps 1] [--repeats 5]
[--skip-gpu]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megalith.core import (
    ModelConfig,
    ParallelConfig,
    ParallelDims,
    RuntimeConfig,
    build_loss_fn,
    build_model_chunks,
    get_preset,
)
from megalith.core.context_parallel import RingComm, shard_microbatch
from megalith.core.context_parallel.blocks import Block, block_forward
from megalith.core.pipeline import microbatch_loss
from megalith.kernels import ops
from tests.harness import run_distributed

CONFIG = dict(
    family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    ffn_hidden_size=128, norm="rmsnorm", activation="swiglu", position_embedding="rope", bias=False,
    tie_embeddings=False,
)  # fmt: skip


class SavedBytes:
    """Counts the bytes of the tensors autograd saves for the backward pass (each storage once)."""

    def __init__(self) -> None:
        self.total, self._seen = 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.total += key[1]
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _batch(seq: int, world: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, seq), generator=gen)
    return shard_microbatch({"input_ids": ids, "labels": torch.roll(ids, -1, 1)}, world, rank)


def _step(model, batch) -> SavedBytes:
    saved = SavedBytes()
    inputs = {k: batch[k] for k in ("position_ids",) if k in batch}
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        logits = model(batch["input_ids"], **inputs)
        loss = microbatch_loss(build_loss_fn(model), logits, batch["labels"], batch.get("num_loss_tokens"))
    loss.backward()
    return saved


def _rings(model) -> list:
    return [layer.attn.core.ring for layer in model.layers.values() if getattr(layer.attn.core, "ring", None)]


def _memory_worker(rank, world, seq, steps):
    ops.set_num_threads(1)
    dims = ParallelDims.from_env(cp=world)
    config = ModelConfig(**CONFIG, max_seq_len=seq)
    runtime = RuntimeConfig(kernels="fused")
    (model,) = build_model_chunks(config, dims, parallel=ParallelConfig(cp=world), runtime=runtime)
    batch = _batch(seq, world, rank)
    times, waits = [], []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        for ring in _rings(model):
            ring.wait_seconds = 0.0
        dist.barrier()
        start = time.perf_counter()
        saved = _step(model, batch)
        times.append(time.perf_counter() - start)
        waits.append(sum(ring.wait_seconds for ring in _rings(model)))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    best = min(range(1, steps + 1), key=lambda i: times[i])
    return saved.total, grown, times[best], waits[best]


def _best(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls, every rank starting together."""
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _overlap_worker(rank, world, seq, repeats):
    """One ring step of cp = 2 at sequence length `seq`: transfer alone, block alone, wait after both."""
    ops.set_num_threads(1)
    dims = ParallelDims.from_env(cp=world)
    config = ModelConfig(**CONFIG, max_seq_len=seq)
    local = seq // world
    ring = RingComm(dims.cp_group)
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, local, config.num_attention_heads, config.head_dim, generator=gen)
    kv = torch.randn(2, 1, local, config.num_kv_heads, config.head_dim, generator=gen)
    block = Block(slice(local // 2, local), slice(0, local), False)  # a later rank's keys: the step's block
    transfer = _best(lambda: ring.shift(kv, 0).wait(), repeats)
    compute = _best(lambda: block_forward(q, kv[0], kv[1], block), repeats)
    waited = float("inf")
    for _ in range(repeats):
        dist.barrier()
        pending = ring.shift(kv, 0)
        block_forward(q, kv[0], kv[1], block)
        start = time.perf_counter()
        pending.wait()
        waited = min(waited, time.perf_counter() - start)
    return transfer, compute, waited


def memory_tables(seqs: list[int], cps: list[int], steps: int) -> None:
    results = {}
    for seq in seqs:
        for cp in cps:
            per_rank = run_distributed(_memory_worker, cp, seq, steps, timeout=3600)
            results[seq, cp] = per_rank
    print("Table 1: one sequence, forward + backward, CPU gloo, ring attention (Megalith kernel), per rank")
    print(f"{'S':>7}{'cp':>4}{'saved act. MiB':>16}{'x cp=1':>8}{'peak RSS +MiB':>15}{'step s':>9}{'ring wait s':>13}")
    for (seq, cp), per_rank in results.items():
        saved = max(r[0] for r in per_rank)
        base = max(r[0] for r in results.get((seq, cps[0]), per_rank))
        grown = max(r[1] for r in per_rank)
        step = max(r[2] for r in per_rank)
        wait = max(r[3] for r in per_rank)
        ratio = f"{saved / base:.2f}" if cps[0] == 1 else "-"
        print(f"{seq:>7}{cp:>4}{saved / 2**20:>16.1f}{ratio:>8}{grown / 2**20:>15.1f}{step:>9.2f}{wait:>13.3f}")


def overlap_table(seqs: list[int], repeats: int) -> None:
    print("\nTable 2: one ring step (cp = 2), key/value transfer against the block's attention (min of repeats)")
    print(f"{'S':>7}{'KV MiB':>8}{'transfer ms':>13}{'block ms':>10}{'wait ms':>9}{'hidden':>8}")
    for seq in seqs:
        per_rank = run_distributed(_overlap_worker, 2, seq, repeats, timeout=3600)
        transfer, compute, waited = (max(r[i] for r in per_rank) for i in range(3))
        kv_bytes = 2 * (seq // 2) * CONFIG["num_kv_heads"] * (CONFIG["hidden_size"] // CONFIG["num_attention_heads"])
        hidden = max(0.0, 1.0 - waited / transfer)
        print(f"{seq:>7}{kv_bytes * 4 / 2**20:>8.2f}{transfer * 1e3:>13.2f}{compute * 1e3:>10.1f}{waited * 1e3:>9.2f}"
              f"{hidden:>8.0%}")  # fmt: skip


def gpu_table(seq: int, steps: int) -> None:
    """llama3-1b at `seq` tokens on one GPU: causal attention against 8 packed documents (tokens/s)."""
    config = get_preset("llama3-1b").replace(max_seq_len=seq)
    runtime = RuntimeConfig(kernels="fused", recompute="full")
    (model,) = build_model_chunks(config, runtime=runtime, device="cuda", dtype=torch.bfloat16)
    loss_fn = build_loss_fn(model, kernels="fused")
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")
    lengths = torch.full((8,), seq // 8)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32).cuda()
    positions = torch.arange(seq // 8, device="cuda").repeat(8)[None]
    print(f"\nTable 3: {config.preset} (bf16, full recompute) at S = {seq} on {torch.cuda.get_device_name()}")
    print(f"{'attention':<28}{'step s':>9}{'tokens/s':>11}")
    for name, inputs in (("causal, whole sequence", {}), ("8 documents (cu_seqlens)", dict(cu_seqlens=cu,
                         position_ids=positions))):  # fmt: skip
        times = []
        for _ in range(steps + 1):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            microbatch_loss(loss_fn, model(ids, **inputs), torch.roll(ids, -1, 1)).backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step = min(times[1:])
        print(f"{name:<28}{step:>9.3f}{seq / step:>11,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=1, help="timed steps per configuration (best is kept)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each Table 2 measurement (min is kept)")
    parser.add_argument("--skip-gpu", action="store_true", help="skip Table 3 even when a GPU is present")
    args = parser.parse_args()
    memory_tables(args.seqs, args.cps, args.steps)
    overlap_table(args.seqs, args.repeats)
    if torch.cuda.is_available() and not args.skip_gpu:
        gpu_table(32768, args.steps)
    else:
        print("\nTable 3: no CUDA GPU here; not measured")


if __name__ == "__main__":
    main()
