"""Blends of several GPT datasets by weight, split strings, and the builder that turns both into datasets."""

from __future__ import annotations

import math
import os

import numpy as np

from megalith.data.cache import IndexCache
from megalith.data.gpt_dataset import SPLIT_NAMES, GPTDataset, GPTDatasetConfig
from megalith.data.indexed import IndexedDataset
from megalith.data.indexing import build_blending_index, build_exhaustive_blending_index

__all__ = ["BlendedDataset", "build_gpt_datasets", "parse_blend", "parse_split", "split_ranges"]

SURPLUS = 0.005  # extra samples asked of each blended dataset, so rounding never runs one dry


def parse_split(split: str) -> list[tuple[float, float]]:
    """`"969,30,1"` -> book-ends [(0, .969), (.969, .999), (.999, 1)] of the train/valid/test fractions."""
    try:
        parts = [float(s) for s in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"split {split!r} must be up to three comma-separated numbers, e.g. '969,30,1'") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"split {split!r} must be 1 to 3 non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    bounds, start = [], 0.0
    for part in parts:
        bounds.append((start, start + part / total))
        start += part / total
    return bounds


def split_ranges(split: str, num_sequences: int) -> list[tuple[int, int]]:
    """[begin, end) sequence ids of each split: round(begin * N) to round(end * N)."""
    return [(round(b * num_sequences), round(e * num_sequences)) for b, e in parse_split(split)]


def parse_blend(blend) -> tuple[list[str], list[float] | None]:
    """`"0.3 prefixA 0.7 prefixB"` -> (prefixes, weights normalised); `"prefixA prefixB"` -> (prefixes, None)."""
    items = blend.split() if isinstance(blend, str) else [str(x) for x in blend]
    if not items:
        raise ValueError("the blend names no dataset")

    def is_number(text):
        try:
            float(text)
        except ValueError:
            return False
        return True

    if not is_number(items[0]):
        if any(is_number(x) for x in items):
            raise ValueError(f"blend {blend!r} mixes weighted and unweighted entries")
        return items, None
    if len(items) % 2:
        raise ValueError(f"blend {blend!r} must alternate 'weight prefix' pairs")
    weights = [float(w) for w in items[0::2]]
    prefixes = items[1::2]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"blend weights {weights} must be non-negative with a positive sum")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


class BlendedDataset:
    """Samples drawn from several datasets in proportion to weights (Megatron-LM's greedy interleave).

    Items are the underlying item dicts plus `dataset_id`. With `size=None` every sample of every dataset is
    used exactly once (weights then follow the dataset sizes).
    """

    def __init__(
        self, datasets, weights=None, size: int | None = None, *, split: str = "train", cache_dir: str | None = None
    ) -> None:
        self.datasets = list(datasets)
        if weights is not None and len(weights) != len(self.datasets):
            raise ValueError(f"{len(weights)} weights for {len(self.datasets)} datasets")
        self.weights = None if weights is None else [float(w) / sum(weights) for w in weights]
        if size is None:

            def build():
                return dict(
                    zip(
                        ("dataset_index", "dataset_sample_index"),
                        build_exhaustive_blending_index([len(d) for d in self.datasets]),
                        strict=True,
                    )
                )
        else:
            if self.weights is None:
                raise ValueError("a BlendedDataset of a given size needs weights")

            def build():
                return dict(
                    zip(
                        ("dataset_index", "dataset_sample_index"),
                        build_blending_index(self.weights, size),
                        strict=True,
                    )
                )

        description = {
            "class": "BlendedDataset",
            "datasets": [getattr(d, "cache", None) and d.cache.base for d in self.datasets],
            "weights": self.weights,
            "size": size,
            "split": split,
        }
        names = ("dataset_index", "dataset_sample_index")
        if cache_dir is not None:
            arrays = IndexCache(cache_dir, "BlendedDataset", split, description, names).load_or_build(build)
        else:
            arrays = build()
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for k, dataset in enumerate(self.datasets):
            used = self.dataset_sample_index[self.dataset_index == k]
            if used.size and int(used.max()) >= len(dataset):
                raise ValueError(
                    f"dataset {k} of the blend has {len(dataset)} samples but the blend needs {int(used.max()) + 1}"
                )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        k = int(self.dataset_index[i])
        item = dict(self.datasets[k][int(self.dataset_sample_index[i])])
        item["dataset_id"] = np.int64(k)
        return item


def build_gpt_datasets(blend, split: str, num_samples, config: GPTDatasetConfig):
    """Train/valid/test datasets from a blend string and a split string (None where a split is empty).

    Args:
        blend: `"prefix"`, `"prefixA prefixB"` or `"0.3 prefixA 0.7 prefixB"` (or a list of those tokens).
        split: `"969,30,1"`-style fractions of every dataset's sequences.
        num_samples: samples wanted per split, (train, valid, test); None entries mean one epoch.
        config: GPTDatasetConfig shared by every dataset.
    """
    prefixes, weights = parse_blend(blend)
    missing = [p for p in prefixes if not IndexedDataset.exists(p)]
    if missing:
        raise FileNotFoundError(f"no .bin/.idx pair for {', '.join(missing)}")
    indexed = [IndexedDataset(p) for p in prefixes]
    for ds in indexed:
        if ds.num_tokens == 0:
            raise ValueError(
                f"dataset {ds.prefix} is empty: {ds.prefix}.idx holds {len(ds.document_indices) - 1} documents, "
                f"{len(ds)} sequences and no tokens"
            )
    out = []
    for s, name in enumerate(SPLIT_NAMES):
        target = num_samples[s]
        parts = []
        for k, ds in enumerate(indexed):
            begin, end = split_ranges(split, len(ds))[s]
            if end <= begin:
                parts = None
                break
            want = target
            if len(indexed) > 1 and target is not None:
                share = weights[k] if weights else 1.0 / len(indexed)
                want = math.ceil(math.ceil(target * share) * (1 + SURPLUS))
            ids = np.arange(begin, end, dtype=np.int32)
            parts.append(GPTDataset(ds, ids, want, config=config, split=name))
        if not parts:
            out.append(None)
        elif len(parts) == 1:
            out.append(parts[0])
        else:
            cache_dir = config.cache_dir or os.path.join(prefixes[0], "cache", "BlendedDataset_indices")
            w = weights or [1.0 / len(parts)] * len(parts)
            out.append(BlendedDataset(parts, w, target, split=name, cache_dir=cache_dir))
    return tuple(out)
