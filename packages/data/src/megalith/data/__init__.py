"""Megalith's data pipeline: Megatron-compatible indexed datasets, tokenizers, GPT and blended datasets.

Needs only numpy and megalith-kernels; never imports torch or the rest of Megalith.
"""

from __future__ import annotations

from megalith.data.indexing import (
    build_blending_index,
    build_exhaustive_blending_index,
    build_sample_index,
    count_samples,
)

__all__ = ["build_blending_index", "build_exhaustive_blending_index", "build_sample_index", "count_samples"]
