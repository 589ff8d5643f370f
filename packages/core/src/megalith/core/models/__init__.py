"""Transformer models (GPT-2 and Llama families) written as single-device PyTorch."""

from megalith.core.models.init import init_tensor, init_weights
from megalith.core.models.kv_cache import KVCache
from megalith.core.models.ops import KERNELS, FusedOps, TorchOps, apply_kernels, get_ops
from megalith.core.models.rope import RotaryTables, rope_tables_at
from megalith.core.models.transformer import IGNORE_INDEX, Transformer, TransformerLayer

__all__ = [
    "IGNORE_INDEX",
    "KERNELS",
    "FusedOps",
    "KVCache",
    "RotaryTables",
    "TorchOps",
    "Transformer",
    "TransformerLayer",
    "apply_kernels",
    "get_ops",
    "init_tensor",
    "init_weights",
    "rope_tables_at",
]
