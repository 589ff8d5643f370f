"""Transformer models (GPT-2 and Llama families) written as single-device PyTorch."""

from megalith.core.models.ops import FusedOps, TorchOps, get_ops
from megalith.core.models.transformer import IGNORE_INDEX, Transformer, TransformerLayer, init_tensor, rope_tables

__all__ = [
    "IGNORE_INDEX",
    "FusedOps",
    "TorchOps",
    "Transformer",
    "TransformerLayer",
    "get_ops",
    "init_tensor",
    "rope_tables",
]
