"""Context parallelism: every sample's sequence split over cp ranks, attention exchanged by ring or all-gather.

`apply_context_parallel(model, dims, comm=...)` is the model-building step (`megalith.core.build`);
`shard_microbatch` cuts a micro-batch to a rank's tokens (the pipeline schedule calls it). See
`layout.py` for which tokens a rank holds, `blocks.py` for which attention blocks it computes and
`attention.py` for the two exchange variants.
"""

from __future__ import annotations

from megalith.core.context_parallel.attention import ContextParallelAttention, RingComm, apply_context_parallel
from megalith.core.context_parallel.layout import (
    check_sequence_length,
    local_positions,
    rank_chunks,
    shard_microbatch,
    shard_sequence,
    unshard_sequence,
)

__all__ = [
    "ContextParallelAttention",
    "RingComm",
    "apply_context_parallel",
    "check_sequence_length",
    "local_positions",
    "rank_chunks",
    "shard_microbatch",
    "shard_sequence",
    "unshard_sequence",
]
