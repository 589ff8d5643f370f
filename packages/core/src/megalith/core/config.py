"""Configuration of the model: its architecture (`ModelConfig`, with named presets) and how it runs (`RuntimeConfig`).

Every component of Megalith owns one keyword-only config dataclass next to its code; `megalith-train` composes
those same objects into its run configuration. Each field carries its help text in its metadata (`option`),
which `--help` prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from megalith.core.fields import option

__all__ = [
    "ARCHITECTURE_FIELDS",
    "PRESETS",
    "ModelConfig",
    "RuntimeConfig",
    "check_tensor_parallel",
    "get_preset",
    "option",
]

_CHOICES = {
    "family": ("gpt", "llama"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu", "swiglu"),
    "position_embedding": ("learned", "rope"),
}
_ROPE_SCALING_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
# The fields that decide tensor shapes and meaning: a checkpoint must agree on them to be loaded.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size",
    "norm", "activation", "position_embedding", "bias", "tie_embeddings",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (what a checkpoint and an export describe)."""

    preset: str | None = option(
        None, help="The named preset these values start from (config files: every field not set comes from it)."
    )
    family: Literal["gpt", "llama"] = option(
        "gpt", help="'gpt' (GPT-2 style) or 'llama'; a label for conversion tools, the fields below define the model."
    )
    vocab_size: int = option(help="True vocabulary size (tensor-parallel layers pad it to a multiple of 128 * tp).")
    hidden_size: int = option(help="Width H of the residual stream.")
    num_layers: int = option(help="Transformer blocks.")
    num_attention_heads: int = option(help="Query heads N (head_dim = hidden_size / N).")
    num_kv_heads: int | None = option(
        None, help="Key/value heads for grouped-query attention; None: num_attention_heads (plain multi-head)."
    )
    ffn_hidden_size: int = option(help="MLP inner size F (SwiGLU: the gate and up projections are each F wide).")
    max_seq_len: int = option(help="Longest sequence (learned position embeddings have this many rows).")
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", help="Normalisation: 'layernorm' or 'rmsnorm'.")
    norm_eps: float = option(1e-5, help="Epsilon of the norms.")
    activation: Literal["gelu", "swiglu"] = option("gelu", help="'gelu' (tanh approximation, as GPT-2) or 'swiglu'.")
    position_embedding: Literal["learned", "rope"] = option(
        "learned", help="'learned' absolute positions (GPT-2) or 'rope' (rotate-half convention)."
    )
    rope_base: float = option(10000.0, help="RoPE base frequency (theta).")
    rope_scaling: dict | None = option(
        None,
        help="Llama-3 frequency scaling: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings.",
    )
    bias: bool = option(True, help="Biases on the linear layers.")
    tie_embeddings: bool = option(True, help="The output projection reuses the token embedding matrix.")
    init_std: float = option(
        0.02, help="Std of the normal initialisation (each block's output projections: / sqrt(2 * num_layers))."
    )

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                     "ffn_hidden_size", "max_seq_len"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if self.rope_scaling is not None:
            keys = set(self.rope_scaling)
            if keys != _ROPE_SCALING_KEYS:
                raise ValueError(
                    f"ModelConfig.rope_scaling must have exactly the keys {sorted(_ROPE_SCALING_KEYS)}, "
                    f"got {sorted(keys)}"
                )
            if self.position_embedding != "rope":
                raise ValueError("ModelConfig.rope_scaling is set but position_embedding is not 'rope'")
            for key, value in self.rope_scaling.items():
                kind = int if key == "original_max_position_embeddings" else (int, float)
                if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < float("inf"):
                    raise ValueError(f"ModelConfig.rope_scaling.{key} must be a positive finite number, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def config_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The values a config file's model section starts from: its preset's ("tiny" when it names none;
        `preset: null` starts from nothing, so every required field must be given)."""
        name = data.get("preset", "tiny")
        if name is None:
            return {}
        if name not in PRESETS:
            raise ValueError(f"preset {name!r} is not one of {', '.join(sorted(PRESETS))}")
        return PRESETS[name].to_dict()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; `ModelConfig.from_dict(cfg.to_dict()) == cfg` (`preset` is left out when None)."""
        out = dataclasses.asdict(self)
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        if out["preset"] is None:
            del out["preset"]
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


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """How the model runs (not what it is): op kernels, activation recomputation, dropout, compilation."""

    kernels: Literal["torch", "fused"] = option(
        "torch", help="Op set: 'torch' (PyTorch, SDPA attention) or 'fused' (Megalith's compiled kernels)."
    )
    recompute: Literal["none", "selective", "full"] = option(
        "none", help="Activation recomputation: 'selective' (the attention core) or 'full' (whole layers)."
    )
    recompute_every: int = option(
        1, help="With recompute='full': recompute layers whose global index is a multiple of this."
    )
    hidden_dropout: float = option(0.0, help="Dropout on the embeddings and each block's two residual branches.")
    attention_dropout: float = option(0.0, help="Dropout on the attention probabilities (kernels='torch' only).")
    compile: bool = option(
        False, help="Compile each transformer block with torch.compile (fullgraph, regional); needs dropout off."
    )

    def __post_init__(self) -> None:
        if not isinstance(self.recompute_every, int) or self.recompute_every < 1:
            raise ValueError(f"RuntimeConfig.recompute_every must be >= 1, got {self.recompute_every!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"RuntimeConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"RuntimeConfig.compile must be true or false, got {self.compile!r}")
        if self.compile and (self.hidden_dropout > 0 or self.attention_dropout > 0):
            raise ValueError(
                f"RuntimeConfig: compile=true needs hidden_dropout ({self.hidden_dropout}) and attention_dropout "
                f"({self.attention_dropout}) of 0: compiled blocks would draw dropout masks from torch.compile's "
                "own random stream, not the model's"
            )
        if self.kernels == "fused" and self.attention_dropout > 0:
            raise ValueError(
                f"RuntimeConfig: kernels='fused' has no attention dropout; set attention_dropout "
                f"({self.attention_dropout}) to 0 or use kernels='torch'"
            )


def _gpt2(name: str, hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        preset=name, family="gpt", vocab_size=50257, hidden_size=hidden, num_layers=layers,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden, max_seq_len=1024, norm="layernorm", norm_eps=1e-5, activation="gelu",
        position_embedding="learned", bias=True, tie_embeddings=True,
    )  # fmt: skip


def _llama3(name, hidden, layers, heads, ffn, *, tie: bool, factor: float) -> ModelConfig:
    scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    return ModelConfig(
        preset=name, family="llama", vocab_size=128256, hidden_size=hidden, num_layers=layers,
        num_attention_heads=heads, num_kv_heads=8, ffn_hidden_size=ffn, max_seq_len=131072, norm="rmsnorm",
        norm_eps=1e-5, activation="swiglu", position_embedding="rope", rope_base=500000.0, rope_scaling=scaling,
        bias=False, tie_embeddings=tie,
    )  # fmt: skip


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        preset="tiny",
        family="gpt",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=256,
        max_seq_len=128,
    ),
    "gpt2-small": _gpt2("gpt2-small", 768, 12, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 24, 16),
    "gpt2-large": _gpt2("gpt2-large", 1280, 36, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 1600, 48, 25),
    "llama3-1b": _llama3("llama3-1b", 2048, 16, 32, 8192, tie=True, factor=32.0),
    "llama3-3b": _llama3("llama3-3b", 3072, 28, 24, 8192, tie=True, factor=32.0),
    "llama3-8b": _llama3("llama3-8b", 4096, 32, 32, 14336, tie=False, factor=8.0),
    "llama3-70b": _llama3("llama3-70b", 8192, 80, 64, 28672, tie=False, factor=8.0),
    "llama2-7b": ModelConfig(
        preset="llama2-7b",
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


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raises ValueError when `config` cannot be split over `tp` tensor-parallel ranks (the one copy of the rule)."""
    rules = [
        ("num_attention_heads", config.num_attention_heads),
        ("num_kv_heads", config.num_kv_heads),
        ("ffn_hidden_size", config.ffn_hidden_size),
    ]
    for name, value in rules:
        if value % tp:
            hint = " (key/value heads are not replicated; use tp <= num_kv_heads)" if name == "num_kv_heads" else ""
            raise ValueError(f"{name} ({value}) is not divisible by tp ({tp}){hint}")
