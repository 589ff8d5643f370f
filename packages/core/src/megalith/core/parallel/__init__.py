"""Tensor and sequence parallelism: autograd collectives, parallel layers, vocab-parallel loss, RNG streams."""

from megalith.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.core.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab_size,
)
from megalith.core.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)
from megalith.core.parallel.random import RNGTracker

__all__ = [
    "ColumnParallelLinear",
    "RNGTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tp_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tp_region",
    "padded_vocab_size",
    "reduce_from_tp_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tp_region",
    "vocab_parallel_cross_entropy",
]
