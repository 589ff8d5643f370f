"""megalith.core: see packages/core/README.md."""

from __future__ import annotations

from importlib import metadata as _metadata

from megalith.core.config import PRESETS, ModelConfig, get_preset
from megalith.core.flops import count_parameters, flops_per_token
from megalith.core.models import Transformer
from megalith.core.parallel import (
    ColumnParallelLinear,
    RNGTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)
from megalith.core.parallel_dims import ParallelDims
from megalith.core.parallelize import parallelize, reduce_sequence_parallel_grads

__version__ = _metadata.version("megalith-core")

__all__ = [
    "PRESETS",
    "ColumnParallelLinear",
    "ModelConfig",
    "ParallelDims",
    "RNGTracker",
    "RowParallelLinear",
    "Transformer",
    "VocabParallelEmbedding",
    "__version__",
    "count_parameters",
    "flops_per_token",
    "get_preset",
    "padded_vocab_size",
    "parallelize",
    "reduce_sequence_parallel_grads",
    "vocab_parallel_cross_entropy",
]
