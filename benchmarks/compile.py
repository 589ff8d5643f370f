"""Training steps with compiled blocks (runtime.compile=true) against eager ones: a table, not a test.

For each configuration of benchmarks/peer.py and op set, a `Trainer` is built twice (eager, compiled) and each
runs `train_step` (forward, backward, gradient sync, clipping, AdamW) on the same token batch. The first step of
the compiled run compiles the block graph; its time is shown apart ("first step"), then the median of the timed
steps after two warm-up steps gives tokens/s. On a CPU, torch.compile generates C++ (a compiler must be present).

    python benchmarks/compile.py [--configs tiny gpt2-small] [--kernels torch fused] [--steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import statistics
import tempfile
import time

import peer
import torch

from megalith.training.trainer import Trainer


def measure(name: str, *, kernels: str, compile_blocks: bool, steps: int, device: str) -> dict:
    """First-step seconds and median-step tokens/s of one Trainer on a fixed batch."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = peer.megalith_config(name, tmp, kernels=kernels, device=device)
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, compile=compile_blocks))
        trainer = Trainer(cfg, stream=io.StringIO())
        t = cfg.training
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=g)
        batch = {"input_ids": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)}
        micro = [batch] * trainer.num_microbatches
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        times = []
        for _ in range(3 + steps):
            sync()
            start = time.perf_counter()
            trainer.train_step(micro)
            sync()
            times.append(time.perf_counter() - start)
        trainer.close()
    per_step = t.global_batch_size * cfg.data.seq_len
    return {"first_step_s": times[0], "tokens_per_s": per_step / statistics.median(times[3:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "gpt2-small"], choices=sorted(peer.CONFIGS))
    parser.add_argument("--kernels", nargs="+", default=["torch", "fused"], choices=["auto", "torch", "fused"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after the first and two warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    rows = []
    for name in args.configs:
        for kernels in args.kernels:
            with contextlib.redirect_stdout(io.StringIO()):
                eager = measure(name, kernels=kernels, compile_blocks=False, steps=args.steps, device=args.device)
                compiled = measure(name, kernels=kernels, compile_blocks=True, steps=args.steps, device=args.device)
            rows.append((name, kernels, eager, compiled))
            print(
                f"{name} {kernels}: compiled {compiled['tokens_per_s'] / eager['tokens_per_s']:.2f}x eager", flush=True
            )
    print(f"\ntorch {torch.__version__}, {args.device}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")  # fmt: skip
    print("| config | kernels | eager tokens/s | compiled tokens/s | compiled / eager | first step eager s | "
          "first step compiled s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, kernels, e, c in rows:
        ratio = c["tokens_per_s"] / e["tokens_per_s"]
        print(f"| {name} | {kernels} | {e['tokens_per_s']:,.0f} | {c['tokens_per_s']:,.0f} | {ratio:.2f}x | "
              f"{e['first_step_s']:.1f} | {c['first_step_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
