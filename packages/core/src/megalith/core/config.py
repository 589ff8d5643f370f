"""ModelConfig: the architecture of a GPT-2 or Llama family transformer, validated, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_CHOICES = {
    "family": ("gpt", "llama"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu", "swiglu"),
    "position_embedding": ("learned", "rope"),
    "kernels": ("torch", "fused"),
    "recompute": ("none", "selective", "full"),
}
_ROPE_SCALING_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (plus the few run-time switches the model code reads)."""

    family: str = "gpt"
    """"gpt" (GPT-2 style) or "llama"; a label for conversion tools, the knobs below define the model."""
    vocab_size: int
    """True vocabulary size (the model pads its embedding to a multiple of 128 * tp internally)."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_attention_heads (plain multi-head)."""
    ffn_hidden_size: int
    """MLP inner size F (SwiGLU: the gate and up projections are each F wide)."""
    max_seq_len: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    """"gelu" (tanh approximation, as GPT-2) or "swiglu"."""
    position_embedding: str = "learned"
    """"learned" absolute positions (GPT-2) or "rope" (rotate-half convention)."""
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    """Llama-3 style frequency scaling: factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings."""
    bias: bool = True
    """Biases on the linear layers."""
    tie_embeddings: bool = True
    """The output projection reuses the token embedding matrix."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (output projections of each block are scaled by
    1/sqrt(2 * num_layers))."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    label_smoothing: float = 0.0
    kernels: str = "torch"
    """"torch" (scaled_dot_product_attention and plain ops) or "fused" (megalith.kernels.ops)."""
    recompute: str = "none"
    """Activation recomputation: "none", "selective" (the attention core) or "full" (whole layers)."""
    recompute_every: int = 1
    """With recompute="full": recompute layers whose global index is a multiple of this (1 = every layer)."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                     "ffn_hidden_size", "max_seq_len", "recompute_every"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelConfig: hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: rope needs an even head_dim, got {self.head_dim}")
        for name in ("norm_eps", "init_std", "rope_base"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("hidden_dropout", "attention_dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.kernels == "fused" and self.attention_dropout > 0:
            raise ValueError(
                f"ModelConfig: kernels='fused' has no attention dropout; set attention_dropout "
                f"({self.attention_dropout}) to 0 or use kernels='torch'"
            )
        if self.rope_scaling is not None:
            keys = set(self.rope_scaling)
            if keys != _ROPE_SCALING_KEYS:
                raise ValueError(
                    f"ModelConfig.rope_scaling must have exactly the keys {sorted(_ROPE_SCALING_KEYS)}, "
                    f"got {sorted(keys)}"
                )
            if self.position_embedding != "rope":
                raise ValueError("ModelConfig.rope_scaling is set but position_embedding is not 'rope'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `ModelConfig.from_dict(cfg.to_dict()) == cfg`."""
        out = dataclasses.asdict(self)
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from `to_dict()` output; unknown keys raise a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _gpt2(hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        family="gpt", vocab_size=50257, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
        ffn_hidden_size=4 * hidden, max_seq_len=1024, norm="layernorm", norm_eps=1e-5, activation="gelu",
        position_embedding="learned", bias=True, tie_embeddings=True,
    )  # fmt: skip


def _llama3(hidden, layers, heads, ffn, *, tie: bool, factor: float) -> ModelConfig:
    scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    return ModelConfig(
        family="llama", vocab_size=128256, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
        num_kv_heads=8, ffn_hidden_size=ffn, max_seq_len=131072, norm="rmsnorm", norm_eps=1e-5,
        activation="swiglu", position_embedding="rope", rope_base=500000.0, rope_scaling=scaling, bias=False,
        tie_embeddings=tie,
    )  # fmt: skip


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        family="gpt",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=256,
        max_seq_len=128,
    ),
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "llama3-1b": _llama3(2048, 16, 32, 8192, tie=True, factor=32.0),
    "llama3-3b": _llama3(3072, 28, 24, 8192, tie=True, factor=32.0),
    "llama3-8b": _llama3(4096, 32, 32, 14336, tie=False, factor=8.0),
    "llama3-70b": _llama3(8192, 80, 64, 28672, tie=False, factor=8.0),
    "llama2-7b": ModelConfig(
        family="llama",
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        ffn_hidden_size=11008,
        max_seq_len=4096,
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        position_embedding="rope",
        rope_base=10000.0,
        bias=False,
        tie_embeddings=False,
    ),
}
"""Named architectures (Hugging Face-compatible shapes: Llama 3.2 1B/3B, Llama 3.1 8B/70B, Llama 2 7B)."""


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
