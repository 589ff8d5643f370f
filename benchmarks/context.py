"""Context parallelism: memory and step time per rank against the sequence length, ring overlap, and (on a GPU)
document-masked against full attention at 32k.

Table 1 runs one forward and backward of a small Llama-style model (RoPE, GQA) over one sequence of S tokens on
a CPU gloo world of cp ranks (ring attention; cp = 1 is the plain model), with Megalith's attention kernel in
every row. It reports per rank the activations autograd saves for the backward (counted through
saved-tensor hooks, so independent of the allocator), the growth of the peak resident memory during the step,
and the step time (best of the timed steps; the slowest rank). The saved activations are linear in the rank's
S / cp tokens: the ratio column (against cp = 1 at the same S) should be near 1 / cp.
Table 2 gives the share of the ring's communication hidden behind compute: the time ranks spent waiting for
key/value (and dK/dV) transfers during a step, against the time the same transfers take with nothing to
overlap them (measured on their own, in the same world).
Table 3 (only with a CUDA GPU): llama3-1b (bf16, full recomputation) at S = 32k on one GPU, causal attention over
the whole sequence against attention within packed documents, tokens/s.

The CPU rows share the machine's cores: with cp ranks on fewer cores, step times measure total work, not the
speed-up a cp-GPU world gets.

Run: .venv/bin/python benchmarks/context.py [--seqs 4096 8192 16384] [--cps 1 2 4] [--steps 2] [--skip-gpu]
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
from megalith.core.context_parallel import shard_microbatch
from megalith.core.pipeline import microbatch_loss
from tests.harness import run_distributed

CONFIG = dict(
    family="llama", vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    ffn_hidden_size=256, norm="rmsnorm", activation="swiglu", position_embedding="rope", bias=False,
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
    comm_alone = _transfers_alone(model, batch, config) if world > 1 else 0.0
    return saved.total, grown, times[best], waits[best], comm_alone


def _transfers_alone(model, batch, config) -> float:
    """Seconds the ring transfers of one step take with no compute between them (best of 3)."""
    ring = _rings(model)[0]
    local = batch["input_ids"].shape[1]
    kv = torch.randn(2, 1, local, config.num_kv_heads, config.head_dim)
    grads = torch.zeros(kv.shape, dtype=torch.float32)
    best = float("inf")
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        for _layer in range(config.num_layers):
            for _ in range(ring.size - 1):  # forward: keys/values
                ring.shift(kv, 0).wait()
            for _ in range(ring.size - 1):  # backward: keys/values again, and the dK/dV accumulator
                ring.shift(kv, 0).wait()
            for _ in range(ring.size):
                ring.shift(grads, 1).wait()
        best = min(best, time.perf_counter() - start)
    return best


def memory_tables(seqs: list[int], cps: list[int], steps: int) -> None:
    results = {}
    for seq in seqs:
        for cp in cps:
            per_rank = run_distributed(_memory_worker, cp, seq, steps, timeout=3600)
            results[seq, cp] = per_rank
    print("Table 1: one sequence, forward + backward, CPU gloo, ring attention (Megalith kernel), per rank")
    print(f"{'S':>7}{'cp':>4}{'saved act. MiB':>16}{'x cp=1':>8}{'peak RSS +MiB':>15}{'step s':>9}")
    for (seq, cp), per_rank in results.items():
        saved = max(r[0] for r in per_rank)
        base = max(r[0] for r in results.get((seq, cps[0]), per_rank))
        grown = max(r[1] for r in per_rank)
        step = max(r[2] for r in per_rank)
        ratio = f"{saved / base:.2f}" if cps[0] == 1 else "-"
        print(f"{seq:>7}{cp:>4}{saved / 2**20:>16.1f}{ratio:>8}{grown / 2**20:>15.1f}{step:>9.2f}")
    print("\nTable 2: ring communication hidden behind compute (per step, summed over layers; slowest rank)")
    print(f"{'S':>7}{'cp':>4}{'transfers alone s':>19}{'waited s':>10}{'hidden':>8}")
    for (seq, cp), per_rank in results.items():
        if cp == 1:
            continue
        alone = max(r[4] for r in per_rank)
        waited = max(r[3] for r in per_rank)
        hidden = max(0.0, 1.0 - waited / alone) if alone > 0 else float("nan")
        print(f"{seq:>7}{cp:>4}{alone:>19.3f}{waited:>10.3f}{hidden:>8.0%}")


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
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (best is kept)")
    parser.add_argument("--skip-gpu", action="store_true", help="skip Table 3 even when a GPU is present")
    args = parser.parse_args()
    memory_tables(args.seqs, args.cps, args.steps)
    if torch.cuda.is_available() and not args.skip_gpu:
        gpu_table(32768, args.steps)
    else:
        print("\nTable 3: no CUDA GPU here; not measured")


if __name__ == "__main__":
    main()
