"""Parameter counts and training FLOPs per token of a ModelConfig (for logging, MFU and planning).

A mixture-of-experts layer holds every routed expert but runs only top_k of them per token: parameter counts
include them all (`count_parameters`) or only the active ones (`count_parameters(..., active=True)`), and the
FLOPs count the active ones (plus the router and the shared expert).
"""

from __future__ import annotations

from megalith.core.config import ModelConfig

__all__ = ["count_parameters", "flops_per_token"]


def _mlp_params(config: ModelConfig, ffn: int) -> int:
    """Matmul weights of one MLP of inner size `ffn`."""
    fc1 = 2 * ffn if config.activation == "swiglu" else ffn
    return fc1 * config.hidden_size + ffn * config.hidden_size


def _layer_matmul_params(config: ModelConfig, layer: int, *, active: bool) -> int:
    """Weights of block `layer` that take part in matmuls (no biases, no norms); only the top_k routed experts
    when `active`."""
    h, d = config.hidden_size, config.head_dim
    n, k = config.num_attention_heads, config.num_kv_heads
    attention = (n + 2 * k) * d * h + h * n * d
    if not config.is_moe_layer(layer):
        return attention + _mlp_params(config, config.ffn_hidden_size)
    experts = config.moe_top_k if active else config.num_experts
    mlp = config.num_experts * h + experts * _mlp_params(config, config.expert_ffn_hidden_size)  # router + experts
    if config.moe_shared_expert_ffn_hidden_size is not None:
        mlp += _mlp_params(config, config.moe_shared_expert_ffn_hidden_size)
        mlp += h if config.moe_shared_expert_gate else 0
    return attention + mlp


def count_parameters(config: ModelConfig, *, include_embeddings: bool = True, active: bool = False) -> int:
    """Canonical parameter count (true vocabulary, no padding; a tied output matrix counted once).

    Args:
        include_embeddings: count the token/position embeddings and the output matrix (False gives the
            "non-embedding" count used in scaling-law papers).
        active: count only the parameters one token runs through (top_k of each MoE layer's routed experts).
    """
    h, d = config.hidden_size, config.head_dim
    n, k, f = config.num_attention_heads, config.num_kv_heads, config.ffn_hidden_size
    norm = 2 * h if config.norm == "layernorm" else h
    total = norm
    for layer in range(config.num_layers):
        total += _layer_matmul_params(config, layer, active=active) + 2 * norm
        total += 2 * d if config.qk_norm else 0
        if config.bias:  # MoE models have no biases (the config refuses them)
            fc1 = 2 * f if config.activation == "swiglu" else f
            total += (n + 2 * k) * d + h + fc1 + h
    if include_embeddings:
        total += config.vocab_size * h
        if config.position_embedding == "learned":
            total += config.max_seq_len * h
        if not config.tie_embeddings:
            total += config.vocab_size * h
    return total


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = True, causal: bool = False) -> float:
    """Matmul FLOPs per token of one forward (+ backward when `training`) pass at sequence length `seq_len`.

    Counts 2 FLOPs per multiply-add of every weight matmul a token runs through (blocks, with the router, the
    top_k routed experts and the shared expert of MoE layers, and the output projection) and of the two attention
    matmuls (scores and weighted values over `seq_len` keys; halved when `causal`, i.e. counting only the unmasked
    half). Training is 3x the forward (the backward computes two matmuls per forward one). Norms, activations,
    softmax and the embedding lookup are not counted, as in the usual MFU convention.
    """
    if seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len must be positive, got {seq_len}")
    layers = sum(_layer_matmul_params(config, i, active=True) for i in range(config.num_layers))
    weights = layers + config.vocab_size * config.hidden_size
    attention = config.num_layers * 2 * 2 * seq_len * config.num_attention_heads * config.head_dim
    if causal:
        attention /= 2
    forward = 2 * weights + attention
    return 3 * forward if training else forward
