"""Megalith's data pipeline: Megatron-compatible indexed datasets, tokenizers, GPT and blended datasets.

Needs only numpy and megalith-kernels (tokenizer libraries are optional extras, imported when used); never
imports torch or the rest of Megalith.
"""

from __future__ import annotations

from megalith.data.blended import BlendedDataset, build_gpt_datasets, parse_blend, parse_split, split_ranges
from megalith.data.gpt_dataset import GPTDataset, GPTDatasetConfig, build_gpt_indices
from megalith.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    optimal_dtype,
)
from megalith.data.indexing import (
    build_blending_index,
    build_exhaustive_blending_index,
    build_sample_index,
    count_samples,
)
from megalith.data.sampler import PretrainingSampler, collate

__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "GPTDatasetConfig",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "PretrainingSampler",
    "build_blending_index",
    "build_exhaustive_blending_index",
    "build_gpt_datasets",
    "build_gpt_indices",
    "build_sample_index",
    "collate",
    "count_samples",
    "optimal_dtype",
    "parse_blend",
    "parse_split",
    "split_ranges",
]
