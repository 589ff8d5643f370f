"""Reading a saved model config dict into `megalith.core.ModelConfig`, every field checked; conversion errors."""

from __future__ import annotations

import math

import torch

from megalith.core.config import ModelConfig, check_tensor_parallel

FAMILIES = ("gpt", "llama", "mixtral", "qwen3", "qwen3_moe")
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


def model_config_from_dict(config: object) -> ModelConfig:
    """The architecture a saved config dict describes (`ModelConfig.to_dict()` form), every field type-checked.

    Conversion reads configs written by any Megalith version or built from a Hugging Face config, so each field
    is checked here with a message naming it, before `ModelConfig` validates the whole.
    """
    if config is None:
        raise ConversionError("the checkpoint holds no model config (megalith.json has no model_config)")
    if not isinstance(config, dict):
        raise ConversionError(f"model config must be a dict, got {type(config).__name__}")
    family = _field(config, "family", str)
    if family not in FAMILIES:
        raise ConversionError(f"model config field 'family' = {family!r} is not one of {list(FAMILIES)}")
    heads = _field(config, "num_attention_heads", int)
    values = {
        "family": family,
        "vocab_size": _field(config, "vocab_size", int),
        "hidden_size": _field(config, "hidden_size", int),
        "num_layers": _field(config, "num_layers", int),
        "num_attention_heads": heads,
        "num_kv_heads": _field(config, "num_kv_heads", int, default=heads),
        "ffn_hidden_size": _field(config, "ffn_hidden_size", int),
        "max_seq_len": _field(config, "max_seq_len", int),
        "norm": _field(config, "norm", str),
        "norm_eps": _field(config, "norm_eps", float),
        "activation": _field(config, "activation", str),
        "position_embedding": _field(config, "position_embedding", str),
        "rope_base": _field(config, "rope_base", float, default=10000.0),
        "rope_scaling": _rope_scaling(config),
        "bias": _field(config, "bias", bool),
        "tie_embeddings": _field(config, "tie_embeddings", bool),
        "init_std": _field(config, "init_std", float, default=0.02),
        "kv_channels": _field(config, "kv_channels", int, required=False),
        "qk_norm": _field(config, "qk_norm", bool, required=False, default=False),
        **_moe_fields(config),
    }
    try:
        return ModelConfig(**values)
    except ValueError as exc:
        raise ConversionError(f"model config: {exc}") from None


# Mixture-of-experts fields of a saved config: (kind, default); absent ones take ModelConfig's defaults.
_MOE_FIELDS = {
    "num_experts": (int, 0), "moe_top_k": (int, 2), "moe_ffn_hidden_size": (int, None),
    "moe_shared_expert_ffn_hidden_size": (int, None), "moe_shared_expert_gate": (bool, False),
    "moe_score_function": (str, "softmax"), "moe_norm_topk_prob": (bool, True), "moe_aux_loss_coeff": (float, 0.0),
    "moe_aux_loss_type": (str, "micro_batch"), "moe_z_loss_coeff": (float, 0.0), "moe_expert_bias": (bool, False),
    "moe_expert_bias_rate": (float, 1e-3), "moe_capacity_factor": (float, None),
    "moe_token_drop_policy": (str, "probs"),
}  # fmt: skip


def _moe_fields(config: dict) -> dict:
    out = {}
    for key, (kind, default) in _MOE_FIELDS.items():
        out[key] = _field(config, key, kind, required=False, default=default)
    freq = config.get("moe_layer_freq", 1)
    ok_list = isinstance(freq, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in freq)
    if not ok_list and (isinstance(freq, bool) or not isinstance(freq, int)):
        raise ConversionError(f"model config field 'moe_layer_freq' = {freq!r} is not an integer or a list of 0/1")
    out["moe_layer_freq"] = list(freq) if isinstance(freq, list) else freq
    return out


def check_parallel(config: ModelConfig, tp: int, pp: int, *, allow_kv_duplication: bool) -> None:
    """Raises when the model cannot be split tp ways in tensor parallel and pp ways in pipeline parallel.

    Megalith's own layouts follow `megalith.core.config.check_tensor_parallel`; TensorRT-LLM also accepts fewer
    key/value heads than tp when tp is a multiple of them (each head is then duplicated), `allow_kv_duplication`.
    """
    if tp < 1 or pp < 1:
        raise ConversionError(f"tp ({tp}) and pp ({pp}) must be at least 1")
    kv = config.num_kv_heads
    # With duplication only the query heads must split (TensorRT-LLM repeats a kv head on tp / kv ranks).
    checked = config.replace(num_kv_heads=config.num_attention_heads) if allow_kv_duplication else config
    try:
        check_tensor_parallel(checked, tp)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if allow_kv_duplication and kv % tp and tp % kv:
        raise ConversionError(f"num_kv_heads ({kv}) must be divisible by tp ({tp}) or a divisor of it")
    if config.num_layers % pp:
        raise ConversionError(f"num_layers ({config.num_layers}) is not divisible by pp ({pp})")
