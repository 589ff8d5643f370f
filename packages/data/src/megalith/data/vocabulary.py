"""The range of token ids a dataset holds (computed once per data, cached) and the check against a vocabulary."""

from __future__ import annotations

import os

import numpy as np

from megalith.data.blended import parse_blend
from megalith.data.cache import IndexCache
from megalith.data.indexed import IndexedDataset

__all__ = ["check_vocabulary", "token_id_range"]

# Bytes of `.bin` read per step: the scan holds this much memory whatever the dataset size.
_READ_BYTES = 64 << 20


def _scan(bin_path: str, dtype: np.dtype) -> np.ndarray:
    """[min, max] of every token in a `.bin` ([0, -1] when it holds none), read in fixed-size blocks."""
    buffer = np.empty(_READ_BYTES // dtype.itemsize, dtype)
    low = high = None
    with open(bin_path, "rb") as handle:
        while count := handle.readinto(memoryview(buffer).cast("B")) // dtype.itemsize:
            block = buffer[:count]
            block_low, block_high = block.min(), block.max()
            low = block_low if low is None else min(low, block_low)
            high = block_high if high is None else max(high, block_high)
    return np.array([0, -1] if low is None else [low, high], np.int64)


def token_id_range(dataset, cache_dir=None) -> tuple[int, int] | None:
    """(smallest, largest) token id of a dataset, or None when it holds no token.

    The scan of the `.bin` runs once per data: the result is cached in `cache_dir` (default
    `<prefix>/cache/token_ids`) under a key made of the `.idx` content (`IndexedDataset.content_key`) and the
    `.bin`'s size and modification time, so a dataset rewritten in place is scanned again.

    Args:
        dataset: an IndexedDataset or its prefix.
        cache_dir: where the cached range goes; a read-only location means scanning every time.
    """
    dataset = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)
    bin_path = dataset.prefix + ".bin"
    stat = os.stat(bin_path)
    description = {
        "class": "TokenIdRange",
        "dataset_path": os.path.abspath(dataset.prefix),
        "dataset_index": dataset.content_key,
        "dtype": dataset.dtype.name,
        "bin_size": stat.st_size,
        "bin_mtime_ns": stat.st_mtime_ns,
    }
    cache = IndexCache(
        cache_dir or os.path.join(dataset.prefix, "cache", "token_ids"), "TokenIdRange", "all", description, ("range",)
    )
    found = cache.load_or_build(lambda: {"range": _scan(bin_path, dataset.dtype)})["range"]
    low, high = int(found[0]), int(found[1])
    return None if low > high else (low, high)


def check_vocabulary(blend, vocab_size: int, cache_dir=None) -> None:
    """Raises ValueError naming the dataset, the id and the vocabulary when a dataset of `blend` holds an id
    outside [0, vocab_size) (an embedding lookup would fail on it in the middle of training).

    Args:
        blend: a blend as `build_gpt_datasets` takes it ("prefix", "0.3 prefixA 0.7 prefixB", or a list).
        vocab_size: the model's vocabulary size.
        cache_dir: where the token-id ranges are cached (see `token_id_range`).
    """
    prefixes, _ = parse_blend(blend)
    for prefix in prefixes:
        found = token_id_range(prefix, cache_dir)
        if found is None:
            continue
        low, high = found
        bad = high if high >= vocab_size else low if low < 0 else None
        if bad is not None:
            raise ValueError(
                f"{prefix}: token id {bad} is outside the model's vocabulary of {vocab_size} ids "
                f"(the dataset holds ids {low} to {high}); was it made with another tokenizer?"
            )
