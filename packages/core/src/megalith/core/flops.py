"""Parameter counts and training FLOPs per token of a ModelConfig (for logging, MFU and planning)."""

from __future__ import annotations

from megalith.core.config import ModelConfig


def _layer_matmul_params(config: ModelConfig) -> int:
    """Weights of one block that take part in matmuls (no biases, no norms)."""
    h, d = config.hidden_size, config.head_dim
    n, k, f = config.num_attention_heads, config.num_kv_heads, config.ffn_hidden_size
    fc1 = 2 * f if config.activation == "swiglu" else f
    return (n + 2 * k) * d * h + h * n * d + fc1 * h + f * h


def count_parameters(config: ModelConfig, *, include_embeddings: bool = True) -> int:
    """Canonical parameter count (true vocabulary, no padding; a tied output matrix counted once).

    Args:
        include_embeddings: count the token/position embeddings and the output matrix (False gives the
            "non-embedding" count used in scaling-law papers).
    """
    h, d = config.hidden_size, config.head_dim
    n, k, f = config.num_attention_heads, config.num_kv_heads, config.ffn_hidden_size
    norm = 2 * h if config.norm == "layernorm" else h
    per_layer = _layer_matmul_params(config) + 2 * norm
    if config.bias:
        fc1 = 2 * f if config.activation == "swiglu" else f
        per_layer += (n + 2 * k) * d + h + fc1 + h
    total = config.num_layers * per_layer + norm
    if include_embeddings:
        total += config.vocab_size * h
        if config.position_embedding == "learned":
            total += config.max_seq_len * h
        if not config.tie_embeddings:
            total += config.vocab_size * h
    return total


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = True, causal: bool = False) -> float:
    """Matmul FLOPs per token of one forward (+ backward when `training`) pass at sequence length `seq_len`.

    Counts 2 FLOPs per multiply-add of every weight matmul (blocks and output projection) and of the two
    attention matmuls (scores and weighted values over `seq_len` keys; halved when `causal`, i.e. counting
    only the unmasked half). Training is 3x the forward (the backward computes two matmuls per forward one).
    Norms, activations, softmax and the embedding lookup are not counted, as in the usual MFU convention.
    """
    if seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len must be positive, got {seq_len}")
    weights = config.num_layers * _layer_matmul_params(config) + config.vocab_size * config.hidden_size
    attention = config.num_layers * 2 * 2 * seq_len * config.num_attention_heads * config.head_dim
    if causal:
        attention /= 2
    forward = 2 * weights + attention
    return 3 * forward if training else forward
