"""The model facts conversion needs, read from a model config dict in `ModelConfig.to_dict()` form.

Export works on dicts rather than `megalith.core.config.ModelConfig` objects so that it reads any saved config
(and needs no model code); `ModelSpec.from_config` checks every field it uses and names the bad one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FAMILIES = ("gpt", "llama")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
NAME_TO_DTYPE = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, field or tensor and the values involved."""


def name_list(names: list[str], limit: int = 20) -> str:
    """`names` as a Python list, only the first `limit` of them when there are more (an input may hold millions)."""
    if len(names) <= limit:
        return str(names)
    return f"{names[:limit]} (and {len(names) - limit} more)"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a bool", dict: "an object"}


def _field(config: dict, key: str, kind, default=None, required=True, name: str | None = None):
    """config[key] checked to be a `kind` (an int is accepted as a float; a bool is never an int); floats finite."""
    name = name or key
    if key not in config or config[key] is None:
        if required and default is None:
            raise ConversionError(f"model config lacks the field {name!r}")
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConversionError(f"model config field {name!r} = {value!r} is not {_KIND_NAMES[kind]}")
    if kind is float and not math.isfinite(value):
        raise ConversionError(f"model config field {name!r} = {value!r} is not finite")
    return value


def _rope_scaling(config: dict) -> dict | None:
    """Llama-3 RoPE scaling: its four fields, typed and positive."""
    scaling = _field(config, "rope_scaling", dict, required=False)
    if scaling is None:
        return None
    missing = [k for k in ROPE_SCALING_KEYS if k not in scaling]
    if missing:
        raise ConversionError(f"model config field 'rope_scaling' lacks {missing} (has {scaling})")
    out = {}
    for key in ROPE_SCALING_KEYS:
        kind = int if key == "original_max_position_embeddings" else float
        out[key] = _field(scaling, key, kind, name=f"rope_scaling.{key}")
        if out[key] <= 0:
            raise ConversionError(f"model config field 'rope_scaling.{key}' = {out[key]!r} must be positive")
    return out


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and structure of one model in canonical form (see CONTRACT: canonical parameter names)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    max_seq_len: int
    norm: str
    norm_eps: float
    activation: str
    position_embedding: str
    rope_base: float
    rope_scaling: dict | None
    bias: bool
    tie_embeddings: bool
    init_std: float = 0.02
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def norm_bias(self) -> bool:
        return self.norm == "layernorm"

    @property
    def learned_positions(self) -> bool:
        return self.position_embedding == "learned"

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        if config is None:
            raise ConversionError("the checkpoint holds no model config (megalith.json has no model_config)")
        if not isinstance(config, dict):
            raise ConversionError(f"model config must be a dict, got {type(config).__name__}")
        family = _field(config, "family", str)
        if family not in FAMILIES:
            raise ConversionError(f"model config field 'family' = {family!r} is not one of {list(FAMILIES)}")
        heads = _field(config, "num_attention_heads", int)
        spec = cls(
            family=family,
            vocab_size=_field(config, "vocab_size", int),
            hidden_size=_field(config, "hidden_size", int),
            num_layers=_field(config, "num_layers", int),
            num_attention_heads=heads,
            num_kv_heads=_field(config, "num_kv_heads", int, default=heads),
            ffn_hidden_size=_field(config, "ffn_hidden_size", int),
            max_seq_len=_field(config, "max_seq_len", int),
            norm=_field(config, "norm", str),
            norm_eps=_field(config, "norm_eps", float),
            activation=_field(config, "activation", str),
            position_embedding=_field(config, "position_embedding", str),
            rope_base=_field(config, "rope_base", float, default=10000.0),
            rope_scaling=_rope_scaling(config),
            bias=_field(config, "bias", bool),
            tie_embeddings=_field(config, "tie_embeddings", bool),
            init_std=_field(config, "init_std", float, default=0.02),
            config=dict(config),
        )
        spec._validate()
        return spec

    def _validate(self) -> None:
        choices = {
            "norm": ("layernorm", "rmsnorm"),
            "activation": ("gelu", "swiglu"),
            "position_embedding": ("learned", "rope"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConversionError(f"model config field {key!r} = {getattr(self, key)!r} is not one of {allowed}")
        positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size",
                    "max_seq_len", "norm_eps", "rope_base")  # fmt: skip
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConversionError(f"model config field {key!r} = {getattr(self, key)!r} must be positive")
        if self.init_std < 0:
            raise ConversionError(f"model config field 'init_std' = {self.init_std!r} must not be negative")
        if self.hidden_size % self.num_attention_heads:
            raise ConversionError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_kv_heads:
            raise ConversionError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by num_kv_heads "
                f"({self.num_kv_heads})"
            )

    def to_config(self) -> dict:
        """The canonical `ModelConfig.to_dict()` form with exactly the CONTRACT field names."""
        return {
            "family": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_kv_heads": self.num_kv_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
            "max_seq_len": self.max_seq_len,
            "norm": self.norm,
            "norm_eps": self.norm_eps,
            "activation": self.activation,
            "position_embedding": self.position_embedding,
            "rope_base": self.rope_base,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling is not None else None,
            "bias": self.bias,
            "tie_embeddings": self.tie_embeddings,
            "init_std": self.init_std,
        }

    def check_parallel(self, tp: int, pp: int, *, allow_kv_duplication: bool) -> None:
        """Raises when the model cannot be split tp ways in tensor parallel and pp ways in pipeline parallel."""
        if tp < 1 or pp < 1:
            raise ConversionError(f"tp ({tp}) and pp ({pp}) must be at least 1")
        if self.num_attention_heads % tp:
            raise ConversionError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by tp ({tp})")
        kv = self.num_kv_heads
        if kv % tp and not (allow_kv_duplication and tp % kv == 0):
            need = f"divisible by tp ({tp})" + (" or a divisor of it" if allow_kv_duplication else "")
            raise ConversionError(f"num_kv_heads ({kv}) must be {need}")
        if self.ffn_hidden_size % tp:
            raise ConversionError(f"ffn_hidden_size ({self.ffn_hidden_size}) is not divisible by tp ({tp})")
        if self.num_layers % pp:
            raise ConversionError(f"num_layers ({self.num_layers}) is not divisible by pp ({pp})")
