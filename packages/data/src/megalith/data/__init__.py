"""Megalith's data pipeline: Megatron-compatible indexed datasets, tokenizers, GPT and blended datasets.

Needs numpy, megalith-kernels and `tokenizers` (tiktoken and sentencepiece are optional extras; every tokenizer
library is imported only when used); never imports torch or the rest of Megalith.
"""

from __future__ import annotations

import importlib

# Submodules load on first use (PEP 562), so a command such as `megalith-preprocess` pays only for what it runs.
_EXPORTS = {
    "megalith.data.blended": ("BlendedDataset", "build_gpt_datasets", "parse_blend", "parse_split", "split_ranges"),
    "megalith.data.gpt_dataset": ("GPTDataset", "GPTDatasetConfig", "build_gpt_indices"),
    "megalith.data.indexed": ("IndexedDataset", "IndexedDatasetError", "IndexedDatasetWriter", "optimal_dtype"),
    "megalith.data.indexing": (
        "build_blending_index",
        "build_exhaustive_blending_index",
        "build_sample_index",
        "count_samples",
    ),
    "megalith.data.sampler": ("PretrainingSampler", "collate"),
    "megalith.data.vocabulary": ("check_vocabulary", "token_id_range"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

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
    "check_vocabulary",
    "collate",
    "count_samples",
    "optimal_dtype",
    "parse_blend",
    "parse_split",
    "split_ranges",
    "token_id_range",
]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'megalith.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
