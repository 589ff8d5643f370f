"""Transformer models (GPT-2 and Llama families) written as single-device PyTorch."""

from megalith.core.models.kv_cache import KVCache
from megalith.core.models.ops import FusedOps, TorchOps, get_ops
from megalith.core.models.transformer import (
    IGNORE_INDEX,
    Transformer,
    TransformerLayer,
    init_tensor,
    rope_tables,
    rope_tables_at,
)

__all__ = [
    "IGNORE_INDEX",
    "FusedOps",
    "KVCache",
    "TorchOps",
    "Transformer",
    "TransformerLayer",
    "get_ops",
    "init_tensor",
    "rope_tables",
    "rope_tables_at",
]
