"""Forward+backward throughput of megalith.core.Transformer against a plain PyTorch model of the same shape.

CPU: the tiny and gpt2-small presets at tp=1 against `PlainGPT` below (same architecture written directly).
GPU (when CUDA is available): llama3-1b, bf16, seq 2048, against Hugging Face LlamaForCausalLM (SDPA) when
`transformers` is installed, with MFU from megalith.core.flops_per_token. Prints a table; not a test.

    python benchmarks/model.py [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from megalith.core import ModelConfig, build_loss_fn, build_model_chunks, flops_per_token, get_preset


class PlainBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.ln1, self.ln2 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps), nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.fc1 = nn.Linear(c.hidden_size, c.ffn_hidden_size)
        self.fc2 = nn.Linear(c.ffn_hidden_size, c.hidden_size)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """GPT-2 written directly in PyTorch (tied embeddings, learned positions): the CPU baseline."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_seq_len, c.hidden_size)
        self.blocks = nn.ModuleList(PlainBlock(c) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)

    def forward(self, ids, labels):
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.norm(x), self.embed.weight)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")


def _megalith(config: ModelConfig, **kwargs) -> nn.Module:
    (model,) = build_model_chunks(config, **kwargs)
    return model


def _step_fn(model, ids, labels, hf=False):
    def step():
        if hf:
            out = model(input_ids=ids, labels=None).logits
            out = F.cross_entropy(out.flatten(0, 1).float(), labels.flatten(), reduction="none")
        elif isinstance(model, PlainGPT):
            out = model(ids, labels)
        else:
            out = build_loss_fn(model)(model(ids), labels)
        out.sum().backward()
        model.zero_grad(set_to_none=True)

    return step


def _compare(steps_a, steps_b, tokens: int, steps: int, sync) -> tuple[float, float]:
    """Tokens/s of two step functions, alternated step by step; the fastest step of each counts (the machine
    may be shared, and interference only ever slows a step down)."""
    best = [float("inf"), float("inf")]
    steps_a(), steps_b()  # warm-up
    for _ in range(steps):
        for i, step in enumerate((steps_a, steps_b)):
            sync()
            start = time.perf_counter()
            step()
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return tokens / best[0], tokens / best[1]


def cpu_rows(steps: int):
    for name, batch, seq in (("tiny", 8, 128), ("gpt2-small", 1, 128)):
        config = get_preset(name)
        ids = torch.randint(0, config.vocab_size, (batch, seq))
        ours, plain = _compare(
            _step_fn(_megalith(config), ids, ids), _step_fn(PlainGPT(config), ids, ids), ids.numel(), steps,
            lambda: None,
        )  # fmt: skip
        yield name, f"{batch}x{seq}", "PlainGPT", ours, plain, ""


def gpu_rows(steps: int):
    config = get_preset("llama3-1b")
    batch, seq, dev = 1, 2048, torch.device("cuda")
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=dev)
    sync = torch.cuda.synchronize
    ours_step = _step_fn(_megalith(config, device=dev, dtype=torch.bfloat16), ids, ids)
    ours, _ = _compare(ours_step, ours_step, ids.numel(), steps, sync)
    peak = torch.cuda.get_device_properties(dev)
    mfu = f"MFU {ours * flops_per_token(config, seq, causal=True) / _peak_bf16(peak.name):.1%}"
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        yield "llama3-1b bf16", f"{batch}x{seq}", "(transformers missing)", ours, float("nan"), mfu
        return
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_base, tie_word_embeddings=config.tie_embeddings, attn_implementation="sdpa",
    )  # fmt: skip
    hf = LlamaForCausalLM(hf_config).to(dev, torch.bfloat16)
    ours, theirs = _compare(ours_step, _step_fn(hf, ids, ids, hf=True), ids.numel(), steps, sync)
    mfu = f"MFU {ours * flops_per_token(config, seq, causal=True) / _peak_bf16(peak.name):.1%}"
    yield "llama3-1b bf16", f"{batch}x{seq}", "HF Llama (sdpa)", ours, theirs, mfu


def _peak_bf16(name: str) -> float:
    """Dense bf16 peak FLOP/s of common GPUs (vendor data sheets)."""
    for key, value in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)):
        if key in name:
            return value
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = list(cpu_rows(args.steps))
    if torch.cuda.is_available():
        rows += list(gpu_rows(args.steps))
    print(f"{'model':<16}{'batch':>8}  {'baseline':<24}{'megalith tok/s':>15}{'baseline tok/s':>15}{'ratio':>8}  note")
    for name, shape, base, ours, plain, note in rows:
        print(f"{name:<16}{shape:>8}  {base:<24}{ours:>15.1f}{plain:>15.1f}{ours / plain:>8.2f}  {note}")


if __name__ == "__main__":
    main()
