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
    "check_expert_parallel",
    "check_tensor_parallel",
    "get_preset",
    "option",
]

_CHOICES = {
    "family": ("gpt", "llama", "mixtral", "qwen3", "qwen3_moe"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu", "swiglu"),
    "position_embedding": ("learned", "rope"),
    "moe_score_function": ("softmax", "sigmoid"),
    "moe_aux_loss_type": ("micro_batch", "sequence"),
    "moe_token_drop_policy": ("probs", "position"),
}
_ROPE_SCALING_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
# The fields that decide tensor shapes and meaning: a checkpoint must agree on them to be loaded.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "kv_channels",
    "ffn_hidden_size", "norm", "activation", "position_embedding", "bias", "tie_embeddings", "qk_norm",
    "num_experts", "moe_top_k", "moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size",
    "moe_shared_expert_gate", "moe_layer_freq", "moe_score_function", "moe_norm_topk_prob", "moe_expert_bias",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (what a checkpoint and an export describe)."""

    preset: str | None = option(
        None, help="The named preset these values start from (config files: every field not set comes from it)."
    )
    family: Literal["gpt", "llama", "mixtral", "qwen3", "qwen3_moe"] = option(
        "gpt",
        help="'gpt' (GPT-2 style), 'llama', 'mixtral', 'qwen3' or 'qwen3_moe'; a label for conversion tools (the "
        "Hugging Face / TensorRT-LLM architecture), the fields below define the model.",
    )
    vocab_size: int = option(help="True vocabulary size (tensor-parallel layers pad it to a multiple of 128 * tp).")
    hidden_size: int = option(help="Width H of the residual stream.")
    num_layers: int = option(help="Transformer blocks.")
    num_attention_heads: int = option(help="Query heads N (head_dim = hidden_size / N unless kv_channels is set).")
    num_kv_heads: int | None = option(
        None, help="Key/value heads for grouped-query attention; None: num_attention_heads (plain multi-head)."
    )
    kv_channels: int | None = option(
        None,
        help="Width D of each attention head (Megatron's --kv-channels, Hugging Face's head_dim); None: "
        "hidden_size / num_attention_heads.",
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
    qk_norm: bool = option(False, help="RMSNorm over each query and key head (weights [head_dim]) before RoPE (Qwen3).")
    num_experts: int = option(0, help="Routed experts of each mixture-of-experts MLP; 0: every MLP is dense.")
    moe_top_k: int = option(2, help="Experts each token is routed to (1 <= moe_top_k <= num_experts).")
    moe_ffn_hidden_size: int | None = option(
        None, help="Inner size of each routed expert (fine-grained experts); None: ffn_hidden_size."
    )
    moe_shared_expert_ffn_hidden_size: int | None = option(
        None, help="Inner size of the shared expert every token also goes through; None: no shared expert."
    )
    moe_shared_expert_gate: bool = option(
        False, help="Scale the shared expert's output by sigmoid(x . w_gate) (Qwen2-MoE); needs a shared expert."
    )
    moe_layer_freq: int | list[int] = option(
        1, help="Which layers are MoE: k (layers whose index is a multiple of k) or a 0/1 list, one entry per layer."
    )
    moe_score_function: Literal["softmax", "sigmoid"] = option(
        "softmax", help="Router scores: 'softmax' over the experts, or 'sigmoid' per expert (DeepSeek-V3)."
    )
    moe_norm_topk_prob: bool = option(
        True,
        help="Normalise the chosen k scores to sum to 1: with softmax this is 'top-k then softmax' (softmax over "
        "the chosen k: Mixtral, Qwen3-MoE); false keeps 'softmax then top-k' (the unnormalised probabilities).",
    )
    moe_aux_loss_coeff: float = option(
        0.0, help="Weight of the switch-style load-balancing loss added to the training objective (0: off)."
    )
    moe_aux_loss_type: Literal["micro_batch", "sequence"] = option(
        "micro_batch", help="Balance the load over each micro-batch's tokens, or over each sequence (DeepSeek-V3)."
    )
    moe_z_loss_coeff: float = option(0.0, help="Weight of the router z-loss, mean(logsumexp(logits)^2) (0: off).")
    moe_expert_bias: bool = option(
        False,
        help="Aux-loss-free balancing: a per-expert bias added to the scores for the choice of experts only, "
        "moved after each step by moe_expert_bias_rate towards the mean load.",
    )
    moe_expert_bias_rate: float = option(
        1e-3, help="Step of the expert-bias update (bias += rate * sign(mean - load))."
    )
    moe_capacity_factor: float | None = option(
        None,
        help="None: no token is dropped. Else, in training, each expert takes at most ceil(factor * T * top_k / "
        "num_experts) of the T tokens of a (data-parallel rank's) micro-batch; moe_token_drop_policy says which are "
        "dropped. Evaluation and decoding drop nothing.",
    )
    moe_token_drop_policy: Literal["probs", "position"] = option(
        "probs",
        help="Over capacity, an expert keeps the tokens with the highest routing weight ('probs') or the earliest "
        "('position'); ties go to the earlier token, then the lower top-k slot.",
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
        for name in ("bias", "tie_embeddings", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.kv_channels is not None and (
            not isinstance(self.kv_channels, int) or isinstance(self.kv_channels, bool) or self.kv_channels < 1
        ):
            raise ValueError(f"ModelConfig.kv_channels must be a positive integer or None, got {self.kv_channels!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
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

        _check_moe(self)

    @property
    def head_dim(self) -> int:
        """Width D of each attention head."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Inner size of each routed expert."""
        return self.moe_ffn_hidden_size if self.moe_ffn_hidden_size is not None else self.ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (global index) has a mixture-of-experts MLP."""
        if self.num_experts == 0:
            return False
        if isinstance(self.moe_layer_freq, int):
            return layer % self.moe_layer_freq == 0
        return bool(self.moe_layer_freq[layer])

    @property
    def num_moe_layers(self) -> int:
        if self.num_experts == 0:
            return 0
        if isinstance(self.moe_layer_freq, int):
            return -(-self.num_layers // self.moe_layer_freq)  # layers 0, k, 2k, ... below num_layers
        return sum(self.moe_layer_freq)

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
        if isinstance(out["moe_layer_freq"], list):
            out["moe_layer_freq"] = list(out["moe_layer_freq"])
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


def check_expert_parallel(config: ModelConfig, ep: int, expert_tp: int = 1) -> None:
    """Raises ValueError when the experts of `config` cannot be split over `ep` ranks, each expert over `expert_tp`."""
    if ep > 1 and config.num_experts == 0:
        raise ValueError(f"ep ({ep}) > 1 needs a mixture-of-experts model (model.num_experts is 0)")
    if config.num_experts % ep:
        raise ValueError(f"num_experts ({config.num_experts}) is not divisible by ep ({ep})")
    if config.num_experts and config.expert_ffn_hidden_size % expert_tp:
        raise ValueError(
            f"the experts' inner size ({config.expert_ffn_hidden_size}) is not divisible by expert_tp ({expert_tp})"
        )


def _check_moe(config: ModelConfig) -> None:
    """The mixture-of-experts fields (checked whether or not num_experts makes them active)."""
    c = config
    for name in ("num_experts",):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
    for name in ("moe_top_k",):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
    for name in ("moe_shared_expert_gate", "moe_norm_topk_prob", "moe_expert_bias"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(c, name)!r}")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"ModelConfig.{name} must be a finite number >= 0, got {value!r}")
    for name in ("moe_expert_bias_rate",) + (("moe_capacity_factor",) if c.moe_capacity_factor is not None else ()):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
    freq = c.moe_layer_freq
    if isinstance(freq, (list, tuple)):
        if len(freq) != c.num_layers or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
            raise ValueError(
                f"ModelConfig.moe_layer_freq as a list needs one 0 or 1 per layer ({c.num_layers}), got {list(freq)}"
            )
        object.__setattr__(c, "moe_layer_freq", list(freq))
    elif not isinstance(freq, int) or isinstance(freq, bool) or freq < 1:
        raise ValueError(f"ModelConfig.moe_layer_freq must be a positive integer or a 0/1 list, got {freq!r}")
    if c.num_experts == 0:
        return
    if c.moe_top_k > c.num_experts:
        raise ValueError(f"ModelConfig: moe_top_k ({c.moe_top_k}) exceeds num_experts ({c.num_experts})")
    if c.bias:
        raise ValueError(f"ModelConfig: experts have no biases; set bias = false (num_experts = {c.num_experts})")
    if c.moe_shared_expert_gate and c.moe_shared_expert_ffn_hidden_size is None:
        raise ValueError(
            "ModelConfig: moe_shared_expert_gate needs a shared expert (moe_shared_expert_ffn_hidden_size)"
        )
    if c.num_moe_layers == 0:
        raise ValueError(f"ModelConfig: num_experts is {c.num_experts} but moe_layer_freq {freq!r} selects no layer")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """How the model runs (not what it is): op kernels, the experts' GEMM, activation recomputation, dropout,
    compilation."""

    kernels: Literal["auto", "torch", "fused"] = option(
        "auto",
        help="Op set: 'auto' (per op, Megalith's kernel where it was measured faster on this device type and dtype, "
        "else PyTorch), 'torch' (PyTorch, SDPA attention) or 'fused' (Megalith's compiled kernels everywhere).",
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
    moe_gemm: Literal["auto", "grouped_mm", "loop"] = option(
        "auto",
        help="How routed experts multiply: 'auto' (torch's grouped GEMM where the build and device take it, else one "
        "matmul per expert), 'grouped_mm' (always; an error where it cannot run) or 'loop'.",
    )

    def __post_init__(self) -> None:
        if self.moe_gemm not in ("auto", "grouped_mm", "loop"):
            raise ValueError(f"RuntimeConfig.moe_gemm must be 'auto', 'grouped_mm' or 'loop', got {self.moe_gemm!r}")
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
    "tiny-moe": ModelConfig(
        preset="tiny-moe",
        family="mixtral",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=128,
        max_seq_len=128,
        norm="rmsnorm",
        activation="swiglu",
        position_embedding="rope",
        bias=False,
        tie_embeddings=False,
        num_experts=8,
        moe_top_k=2,
        moe_ffn_hidden_size=64,
        moe_aux_loss_coeff=0.01,
        moe_z_loss_coeff=0.001,
    ),
    "mixtral-8x7b": ModelConfig(
        preset="mixtral-8x7b",
        family="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        max_seq_len=32768,
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        position_embedding="rope",
        rope_base=1e6,
        bias=False,
        tie_embeddings=False,
        num_experts=8,
        moe_top_k=2,
        moe_aux_loss_coeff=0.02,
    ),
    "qwen3-30b-a3b": ModelConfig(
        preset="qwen3-30b-a3b",
        family="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        num_layers=48,
        num_attention_heads=32,
        num_kv_heads=4,
        kv_channels=128,
        ffn_hidden_size=6144,
        max_seq_len=40960,
        norm="rmsnorm",
        norm_eps=1e-6,
        activation="swiglu",
        position_embedding="rope",
        rope_base=1e6,
        bias=False,
        tie_embeddings=False,
        qk_norm=True,
        num_experts=128,
        moe_top_k=8,
        moe_ffn_hidden_size=768,
        moe_aux_loss_coeff=0.001,
    ),
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
"""Named architectures (Hugging Face-compatible shapes: Llama 3.2 1B/3B, Llama 3.1 8B/70B, Llama 2 7B, Mixtral 8x7B,
Qwen3-30B-A3B; `tiny-moe` is a mixture-of-experts model that trains on a CPU in a minute)."""


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raises ValueError when `config` cannot be split over `tp` tensor-parallel ranks (the one copy of the rule)."""
    rules = [("num_attention_heads", config.num_attention_heads), ("num_kv_heads", config.num_kv_heads)]
    if config.num_moe_layers < config.num_layers:  # some layer has a dense MLP
        rules.append(("ffn_hidden_size", config.ffn_hidden_size))
    if config.num_experts and config.moe_shared_expert_ffn_hidden_size is not None:
        rules.append(("moe_shared_expert_ffn_hidden_size", config.moe_shared_expert_ffn_hidden_size))
    for name, value in rules:
        if value % tp:
            hint = " (key/value heads are not replicated; use tp <= num_kv_heads)" if name == "num_kv_heads" else ""
            raise ValueError(f"{name} ({value}) is not divisible by tp ({tp}){hint}")
