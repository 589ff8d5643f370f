"""A Hugging Face GPT-2 / Llama / Mixtral / Qwen3 / Qwen3-MoE config.json read into a ModelConfig, every field it
uses type-checked."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from megalith.core.config import ModelConfig
from megalith.export.fields import Fields, show
from megalith.export.spec import NAME_TO_DTYPE, ConversionError, model_config_from_dict

ARCHITECTURES = {
    "gpt": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
MODEL_TYPES = {"gpt2": "gpt", "llama": "llama", "mixtral": "mixtral", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
# Megalith's "gelu" is the tanh approximation GPT-2 was trained with; Hugging Face calls it "gelu_new"
# ("gelu_pytorch_tanh" and "gelu_fast" are the same function computed differently).
GPT2_ACTIVATION = "gelu_new"
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def spec_from_hf_config(config: object, path: Path) -> ModelConfig:
    """Canonical model description of a Hugging Face GPT-2 or Llama config.json; raises for anything else."""
    fields = Fields(config, path)
    architectures = fields.strings("architectures", [])
    model_type = fields.string("model_type", "")
    if model_type not in MODEL_TYPES or any(a not in ARCHITECTURES.values() for a in architectures):
        raise ConversionError(
            f"{path}: unsupported architecture {architectures} (model_type {model_type!r}); "
            f"supported: {sorted(ARCHITECTURES.values())}"
        )
    readers = {"gpt2": _gpt2_config, "llama": _llama_config, "mixtral": _mixtral_config, "qwen3": _qwen3_config,
               "qwen3_moe": _qwen3_moe_config}  # fmt: skip
    canonical = readers[model_type](fields)
    try:
        return model_config_from_dict(canonical)
    except ConversionError as exc:  # a structural problem (divisibility); the fields themselves were checked
        raise ConversionError(f"{path}: {exc}") from None


def _gpt2_config(fields: Fields) -> dict:
    path = fields.path
    act = fields.string("activation_function", GPT2_ACTIVATION)
    if act == "gelu":
        warnings.warn(
            f"{path}: activation_function 'gelu' is the exact (erf) GELU; Megalith computes the tanh approximation "
            "(gelu_new), so logits will differ slightly (about 1e-4 relative)",
            stacklevel=4,
        )
    elif act not in GPT2_TANH_GELUS:
        raise ConversionError(f"{path}: activation_function {act!r} is not supported (use gelu_new)")
    for key, want in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
        if fields.boolean(key, want) != want:
            raise ConversionError(f"{path}: {key} = {show(not want)} is not supported (needs {show(want)})")
    hidden, heads = fields.integer("n_embd"), fields.integer("n_head")
    return {
        "family": "gpt",
        "vocab_size": fields.integer("vocab_size"),
        "hidden_size": hidden,
        "num_layers": fields.integer("n_layer"),
        "num_attention_heads": heads,
        "num_kv_heads": heads,
        "ffn_hidden_size": fields.integer("n_inner", 4 * hidden),
        "max_seq_len": fields.integer("n_positions"),
        "norm": "layernorm",
        "norm_eps": fields.number("layer_norm_epsilon", 1e-5, positive=True),
        "activation": "gelu",
        "position_embedding": "learned",
        "rope_base": 10000.0,
        "rope_scaling": None,
        "bias": True,
        "tie_embeddings": fields.boolean("tie_word_embeddings", True),
        "init_std": fields.number("initializer_range", 0.02),
    }


def _llama_rope(fields: Fields) -> tuple[float, dict | None]:
    """RoPE base and Llama-3 scaling, from the v4 keys (rope_theta, rope_scaling) or v5's rope_parameters."""
    params = fields.nested("rope_parameters")
    base = fields.number("rope_theta", None, positive=True)
    if base is None:
        base = params.number("rope_theta", 10000.0, positive=True) if params is not None else 10000.0
    scaling = fields.nested("rope_scaling")
    if scaling is None and params is not None and params.string("rope_type", "default") != "default":
        scaling = params
    if scaling is None:
        return base, None
    kind = scaling.string("rope_type", None) if scaling.has("rope_type") else scaling.string("type", None)
    if kind == "default":
        return base, None
    if kind != "llama3":
        raise ConversionError(
            f"{fields.path}: rope_scaling type {kind!r} is not supported (only llama3): {show(scaling.doc)}"
        )
    return base, {
        "factor": scaling.number("factor", positive=True),
        "low_freq_factor": scaling.number("low_freq_factor", positive=True),
        "high_freq_factor": scaling.number("high_freq_factor", positive=True),
        "original_max_position_embeddings": scaling.integer("original_max_position_embeddings"),
    }


def _llama_config(fields: Fields) -> dict:
    path = fields.path
    attn_bias, mlp_bias = fields.boolean("attention_bias", False), fields.boolean("mlp_bias", False)
    if attn_bias != mlp_bias:
        raise ConversionError(f"{path}: attention_bias ({attn_bias}) != mlp_bias ({mlp_bias}) is not supported")
    return _llama_like(fields, "llama", bias=attn_bias, head_dim_free=False)


def _llama_like(fields: Fields, family: str, *, bias: bool, head_dim_free: bool) -> dict:
    """The fields Llama, Mixtral and Qwen3 share; `head_dim_free`: head_dim may differ from hidden / heads."""
    path = fields.path
    act = fields.string("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{path}: hidden_act {act!r} is not supported (needs silu)")
    hidden, heads = fields.integer("hidden_size"), fields.integer("num_attention_heads")
    head_dim = fields.integer("head_dim", hidden // heads or 1)
    if head_dim * heads != hidden and not head_dim_free:
        raise ConversionError(
            f"{path}: head_dim ({head_dim}) * num_attention_heads ({heads}) != hidden_size ({hidden}); "
            "Megalith needs head_dim = hidden_size / num_attention_heads"
        )
    base, scaling = _llama_rope(fields)
    if scaling is not None and family != "llama":
        raise ConversionError(f"{path}: rope_scaling is not supported for {ARCHITECTURES[family]}")
    return {
        "family": family,
        "kv_channels": None if head_dim * heads == hidden else head_dim,
        "vocab_size": fields.integer("vocab_size"),
        "hidden_size": hidden,
        "num_layers": fields.integer("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_kv_heads": fields.integer("num_key_value_heads", heads),
        "ffn_hidden_size": fields.integer("intermediate_size"),
        "max_seq_len": fields.integer("max_position_embeddings"),
        "norm": "rmsnorm",
        "norm_eps": fields.number("rms_norm_eps", 1e-6, positive=True),
        "activation": "swiglu",
        "position_embedding": "rope",
        "rope_base": base,
        "rope_scaling": scaling,
        "bias": bias,
        "tie_embeddings": fields.boolean("tie_word_embeddings", False),
        "init_std": fields.number("initializer_range", 0.02),
    }


def _no_sliding_window(fields: Fields) -> None:
    if fields.boolean("use_sliding_window", False) or (
        not fields.has("use_sliding_window") and fields.integer("sliding_window", None) is not None
    ):
        raise ConversionError(f"{fields.path}: sliding-window attention is not supported (sliding_window must be null)")


def _mixtral_config(fields: Fields) -> dict:
    _no_sliding_window(fields)
    out = _llama_like(fields, "mixtral", bias=False, head_dim_free=True)
    out.update(
        num_experts=fields.integer("num_local_experts"),
        moe_top_k=fields.integer("num_experts_per_tok"),
        moe_aux_loss_coeff=fields.number("router_aux_loss_coef", 0.0),
    )
    return out


def _qwen3_config(fields: Fields, family: str = "qwen3") -> dict:
    _no_sliding_window(fields)
    if fields.boolean("attention_bias", False):
        raise ConversionError(
            f"{fields.path}: attention_bias = true is not supported (Megalith's biases cover the MLP too, which "
            f"{ARCHITECTURES[family]} has without biases)"
        )
    return {**_llama_like(fields, family, bias=False, head_dim_free=True), "qk_norm": True}


def _qwen3_moe_config(fields: Fields) -> dict:
    out = _qwen3_config(fields, "qwen3_moe")
    layers = out["num_layers"]
    key = "num_experts" if fields.has("num_experts") else "num_local_experts"
    step = fields.integer("decoder_sparse_step", 1)
    dense = fields.doc.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise ConversionError(f"{fields.path}: field 'mlp_only_layers' = {show(dense)} is not a list of layer indices")
    # Hugging Face's rule: a layer is sparse unless listed in mlp_only_layers, and only every step-th (1-based).
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(min(layers, 1 << 20))]
    out.update(
        num_experts=fields.integer(key),
        moe_top_k=fields.integer("num_experts_per_tok"),
        moe_ffn_hidden_size=fields.integer("moe_intermediate_size"),
        moe_norm_topk_prob=fields.boolean("norm_topk_prob", False),
        moe_aux_loss_coeff=fields.number("router_aux_loss_coef", 0.0),
        moe_layer_freq=1 if all(pattern) else pattern,
    )
    return out


def hf_dtype(config: object, path: Path) -> torch.dtype:
    """The dtype config.json declares (torch_dtype, or v5's dtype); float32 when it declares none."""
    fields = Fields(config, path)
    name = fields.string("torch_dtype", None) or fields.string("dtype", None) or "float32"
    if name not in NAME_TO_DTYPE:
        raise ConversionError(f"{path}: torch_dtype {name!r} is not one of {sorted(NAME_TO_DTYPE)}")
    return NAME_TO_DTYPE[name]
