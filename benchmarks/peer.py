"""A Megalith training step against a plain Hugging Face `transformers` loop on the same model (the peer baseline).

For each configuration, in one process and interleaved step by step:

- Megalith: a `Trainer` built from a `RunConfig` with the defaults a user gets (synthetic data, fp32 on CPU or bf16
  on GPU), running what `Trainer.fit` runs per step: fetch the micro-batches, `train_step` (pipeline schedule,
  gradient sync, clipping, AdamW, schedule), record and log;
- Hugging Face: `LlamaForCausalLM` / `GPT2LMHeadModel` (SDPA attention) with the same shapes, in a bare loop of
  forward with labels, backward, `torch.optim.AdamW.step()` and `zero_grad()` on the same token batches.

The best steady-state tokens/s of each is reported (the first steps warm up; the machine may be shared, and
interference only slows a step down), and a `torch.profiler` breakdown of one Megalith step by phase (the
`megalith.*` ranges the code records: data, forward, backward, gradient sync, clipping and norm, optimizer, logging).

    python benchmarks/peer.py [--configs tiny llama-512 gpt2-small] [--steps 8] [--kernels auto fused]
    python benchmarks/peer.py --configs llama3-1b --device cuda     # the GPU comparison the GPU report calls
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections import defaultdict

# The sibling benchmarks/kernels.py would shadow the `kernels` package transformers looks for; nothing here
# imports a sibling script, so the script's own folder leaves the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402

from megalith.training.config_tree import load_config  # noqa: E402
from megalith.training.run_config import RunConfig  # noqa: E402
from megalith.training.trainer import Trainer  # noqa: E402

# name -> (model overrides, seq_len, global batch)
CONFIGS: dict[str, tuple[list[str], int, int]] = {
    "tiny": (["model.preset=tiny", "model.family=llama", "model.hidden_size=128", "model.num_layers=4",
              "model.num_attention_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=344",
              "model.max_seq_len=256", "model.norm=rmsnorm", "model.activation=swiglu",
              "model.position_embedding=rope", "model.bias=false", "model.tie_embeddings=false"], 128, 8),
    "llama-512": (["model.preset=tiny", "model.family=llama", "model.vocab_size=8000", "model.hidden_size=512",
                   "model.num_layers=4", "model.num_attention_heads=8", "model.num_kv_heads=4",
                   "model.ffn_hidden_size=1376", "model.max_seq_len=256", "model.norm=rmsnorm",
                   "model.activation=swiglu", "model.position_embedding=rope", "model.bias=false",
                   "model.tie_embeddings=false"], 256, 4),
    "gpt2-small": (["model.preset=gpt2-small"], 256, 2),
    "llama3-1b": (["model.preset=llama3-1b"], 4096, 1),
}  # fmt: skip
PHASES = ("data", "forward", "backward", "grad_sync", "grad_norm_clip", "optimizer", "logging")


def megalith_config(name: str, tmp: str, *, kernels: str, device: str) -> RunConfig:
    model, seq, batch = CONFIGS[name]
    dtype = "bf16" if device == "cuda" else "fp32"
    return load_config(
        RunConfig,
        None,
        [*model, f"data.seq_len={seq}", f"training.global_batch_size={batch}", f"training.micro_batch_size={batch}",
         "training.train_iters=100000", f"runtime.kernels={kernels}", f"precision.dtype={dtype}",
         f"parallel.device={device}", "logging.tensorboard=false", "logging.log_interval=1",
         "logging.progress_bar=off", f"logging.run_dir={tmp}/run", "optimizer.lr=1e-4"],
    )  # fmt: skip


def hf_model(cfg: RunConfig, device: str):
    """The same architecture in transformers (SDPA attention), same dtype."""
    import transformers

    m = cfg.model
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if m.family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_base, tie_word_embeddings=m.tie_embeddings, attention_bias=m.bias, mlp_bias=m.bias,
            attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=m.vocab_size, n_positions=m.max_seq_len, n_embd=m.hidden_size, n_layer=m.num_layers,
            n_head=m.num_attention_heads, n_inner=m.ffn_hidden_size, activation_function="gelu_new",
            tie_word_embeddings=m.tie_embeddings, attn_implementation="sdpa",
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    return model.to(device=device, dtype=dtype).train()


class _Pair:
    """The two contenders, each advanced one step at a time."""

    def __init__(self, cfg: RunConfig, device: str) -> None:
        self.trainer = Trainer(cfg, stream=io.StringIO())
        t = cfg.training
        self.batches = self.trainer._batches(self.trainer.train_data, 0, 10**9 * t.global_batch_size)
        self.hf = hf_model(cfg, device)
        self.hf_opt = torch.optim.AdamW(self.hf.parameters(), lr=1e-4, weight_decay=0.1)
        g = torch.Generator().manual_seed(0)
        shape = (t.global_batch_size, cfg.data.seq_len)
        self.hf_ids = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.tokens = t.global_batch_size * cfg.data.seq_len

    def megalith_step(self) -> None:
        trainer = self.trainer
        with torch.profiler.record_function("megalith.data"):
            micro = [next(self.batches) for _ in range(trainer.num_microbatches)]
        out = trainer.train_step(micro)
        with torch.profiler.record_function("megalith.logging"):
            trainer._record(out)

    def hf_step(self) -> None:
        loss = self.hf(input_ids=self.hf_ids, labels=self.hf_ids).loss
        loss.backward()
        self.hf_opt.step()
        self.hf_opt.zero_grad(set_to_none=True)

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def compare(name: str, *, kernels: str, device: str, steps: int, warmup: int = 2) -> dict:
    """Best tokens/s of Megalith and of the HF loop (interleaved), and Megalith's per-phase breakdown."""
    with tempfile.TemporaryDirectory() as tmp:
        pair = _Pair(megalith_config(name, tmp, kernels=kernels, device=device), device)
        times: dict[str, list[float]] = {"megalith": [], "hf": []}
        for i in range(warmup + steps):
            for key, fn in (("megalith", pair.megalith_step), ("hf", pair.hf_step)):
                elapsed = pair.timed(fn)
                if i >= warmup:
                    times[key].append(elapsed)
        breakdown = profile_step(pair)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        pair.trainer.close()
    best = {k: pair.tokens / min(v) for k, v in times.items()}
    return {"config": name, "kernels": kernels, "device": device, "tokens": pair.tokens, "tokens_per_s": best,
            "ratio": best["megalith"] / best["hf"], "breakdown": breakdown, "peak_gib": peak}  # fmt: skip


def profile_step(pair: _Pair) -> dict[str, float]:
    """Milliseconds of one Megalith step in each `megalith.*` phase (CPU time of the ranges), plus the total."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        pair.megalith_step()
        total = time.perf_counter() - start
    spent: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("megalith."):
            spent[event.key.removeprefix("megalith.")] += event.cpu_time_total / 1e3
    out = {phase: spent.get(phase, 0.0) for phase in PHASES}
    out["total"] = total * 1e3
    out["other"] = max(0.0, out["total"] - sum(out[p] for p in PHASES))
    return out


def print_results(results: list[dict]) -> None:
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    print("\n| config | kernels | HF tokens/s | Megalith tokens/s | Megalith / HF |")
    print("|---|---|---|---|---|")
    for r in results:
        t = r["tokens_per_s"]
        print(f"| {r['config']} | {r['kernels']} | {t['hf']:,.0f} | {t['megalith']:,.0f} | {r['ratio']:.2f}x |")
    print("\nMegalith step by phase, ms (one profiled step; `other`: outside the recorded phases)")
    print("| config | kernels | " + " | ".join((*PHASES, "other", "total")) + " |")
    print("|---|---|" + "---|" * (len(PHASES) + 2))
    for r in results:
        b = r["breakdown"]
        print(f"| {r['config']} | {r['kernels']} | " + " | ".join(f"{b[p]:.1f}" for p in (*PHASES, "other", "total"))
              + " |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "llama-512", "gpt2-small"], choices=sorted(CONFIGS))
    parser.add_argument("--kernels", nargs="+", default=["auto", "fused"], choices=["auto", "torch", "fused"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    results = []
    for name in args.configs:
        for kernels in args.kernels:
            with contextlib.redirect_stdout(io.StringIO()):
                result = compare(name, kernels=kernels, device=args.device, steps=args.steps)
            results.append(result)
            print(f"{name} {kernels}: Megalith {result['ratio']:.2f}x HF", flush=True)
    print_results(results)


if __name__ == "__main__":
    main()
