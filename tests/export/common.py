"""Test helpers: tiny model configs, random canonical tensors, an in-memory source and a float64 reference forward.

Shapes and the forward pass are written here from the CONTRACT's canonical form, independently of the exporter.
"""

from __future__ import annotations

import math

import torch

BASE = {"max_seq_len": 32, "rope_base": 10000.0, "rope_scaling": None, "init_std": 0.02}

CONFIGS = {
    # GPT-2 family, vocabulary not a multiple of 128, tied output.
    "gpt_tied": dict(BASE, family="gpt", vocab_size=103, hidden_size=32, num_layers=2, num_attention_heads=4,
                     num_kv_heads=4, ffn_hidden_size=64, norm="layernorm", norm_eps=1e-5, activation="gelu",
                     position_embedding="learned", bias=True, tie_embeddings=True),
    "gpt_untied": dict(BASE, family="gpt", vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4,
                       num_kv_heads=4, ffn_hidden_size=48, norm="layernorm", norm_eps=1e-5, activation="gelu",
                       position_embedding="learned", bias=True, tie_embeddings=False),
    # Llama, GQA (8 query heads, 2 kv heads), Llama-3 RoPE scaling, untied.
    "llama_gqa": dict(BASE, family="llama", vocab_size=101, hidden_size=64, num_layers=4, num_attention_heads=8,
                      num_kv_heads=2, ffn_hidden_size=96, norm="rmsnorm", norm_eps=1e-6, activation="swiglu",
                      position_embedding="rope", rope_base=500000.0, bias=False, tie_embeddings=False,
                      rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8}),
    # Llama, one kv head (MQA), biases, tied output.
    "llama_mqa_tied": dict(BASE, family="llama", vocab_size=90, hidden_size=32, num_layers=2, num_attention_heads=4,
                           num_kv_heads=1, ffn_hidden_size=64, norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
                           position_embedding="rope", bias=True, tie_embeddings=True),
}  # fmt: skip


def canonical_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape, straight from the CONTRACT table."""
    v, h, f = cfg["vocab_size"], cfg["hidden_size"], cfg["ffn_hidden_size"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_kv_heads"]
    d = h // nq
    norm_bias = cfg["norm"] == "layernorm"
    fc1 = 2 * f if cfg["activation"] == "swiglu" else f
    shapes = {"embed.weight": (v, h)}
    if cfg["position_embedding"] == "learned":
        shapes["pos_embed.weight"] = (cfg["max_seq_len"], h)
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        layer = {
            "attn_norm.weight": (h,),
            "attn.qkv.weight": ((nq + 2 * nkv) * d, h),
            "attn.proj.weight": (h, nq * d),
            "mlp_norm.weight": (h,),
            "mlp.fc1.weight": (fc1, h),
            "mlp.fc2.weight": (h, f),
        }
        if norm_bias:
            layer.update({"attn_norm.bias": (h,), "mlp_norm.bias": (h,)})
        if cfg["bias"]:
            layer.update({"attn.qkv.bias": ((nq + 2 * nkv) * d,), "attn.proj.bias": (h,), "mlp.fc1.bias": (fc1,),
                          "mlp.fc2.bias": (h,)})  # fmt: skip
        shapes.update({p + k: s for k, s in layer.items()})
    shapes["final_norm.weight"] = (h,)
    if norm_bias:
        shapes["final_norm.bias"] = (h,)
    if not cfg["tie_embeddings"]:
        shapes["output.weight"] = (v, h)
    return shapes


def random_tensors(cfg: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in canonical_shapes(cfg).items():
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if "norm.weight" in name:
            t = 1.0 + 0.1 * t
        elif name.endswith(".bias") or "norm" in name:
            t = 0.05 * t
        else:
            t = 0.1 * t
        out[name] = t.to(dtype)
    return out


class DictSource:
    """An in-memory model source (the protocol ModelCheckpointReader satisfies)."""

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor], tokenizer_dir=None):
        self.model_config = dict(cfg)
        self.tensors = tensors
        self.tokenizer_dir = tokenizer_dir
        self.reads: list[str] = []

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self.tensors[name].clone()


def _norm(cfg, x, w, b):
    if cfg["norm"] == "layernorm":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg["norm_eps"]) * w + b
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg["norm_eps"]) * w


def _inv_freq(cfg, d):
    inv = 1.0 / cfg["rope_base"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = cfg["rope_scaling"]
    if s is None:
        return inv
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    out = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s["factor"])
        else:
            t = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - t) * f / s["factor"] + t * f)
    return torch.tensor(out, dtype=torch.float64)


def _rope(x, inv):  # x [B, N, S, D], rotate-half convention
    s, d = x.shape[2], x.shape[3]
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(cfg: dict, tensors: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Float64 forward of the canonical tensors: [B, S] token ids -> [B, S, V] logits."""
    w = {k: v.double() for k, v in tensors.items()}
    zero = torch.zeros(cfg["hidden_size"], dtype=torch.float64)
    b = lambda name: w.get(name, zero)  # noqa: E731
    nq, nkv = cfg["num_attention_heads"], cfg["num_kv_heads"]
    d = cfg["hidden_size"] // nq
    bsz, s = ids.shape
    x = w["embed.weight"][ids]
    if cfg["position_embedding"] == "learned":
        x = x + w["pos_embed.weight"][:s]
    mask = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}."
        h = _norm(cfg, x, w[p + "attn_norm.weight"], b(p + "attn_norm.bias"))
        qkv = h @ w[p + "attn.qkv.weight"].T
        if p + "attn.qkv.bias" in w:
            qkv = qkv + w[p + "attn.qkv.bias"]
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], -1)
        q, k, v = (t.reshape(bsz, s, -1, d).transpose(1, 2) for t in (q, k, v))
        if cfg["position_embedding"] == "rope":
            inv = _inv_freq(cfg, d)
            q, k = _rope(q, inv), _rope(k, inv)
        k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(bsz, s, -1) @ w[p + "attn.proj.weight"].T + b(p + "attn.proj.bias")
        h = _norm(cfg, x, w[p + "mlp_norm.weight"], b(p + "mlp_norm.bias"))
        f = h @ w[p + "mlp.fc1.weight"].T
        if p + "mlp.fc1.bias" in w:
            f = f + w[p + "mlp.fc1.bias"]
        if cfg["activation"] == "swiglu":
            gate, up = f.chunk(2, -1)
            a = gate * torch.sigmoid(gate) * up
        else:
            a = 0.5 * f * (1 + torch.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f**3)))  # GPT-2's GELU
        x = x + a @ w[p + "mlp.fc2.weight"].T + b(p + "mlp.fc2.bias")
    x = _norm(cfg, x, w["final_norm.weight"], b("final_norm.bias"))
    return x @ w.get("output.weight", w["embed.weight"]).T
