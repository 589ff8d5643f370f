"""Sample and blending index builders for GPT-style datasets (thin, checked wrappers over the C++ builders)."""

from __future__ import annotations

import numpy as np

from megalith.kernels import _C

__all__ = ["build_blending_index", "build_exhaustive_blending_index", "build_sample_index", "count_samples"]


def _as_index_array(name: str, values, dtype) -> np.ndarray:
    """Returns `values` as a 1-D contiguous array of `dtype`, refusing non-integers and values that do not fit."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype != dtype and array.size:
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise ValueError(f"{name} holds values in [{low}, {high}], outside the range of {np.dtype(dtype).name}")
    return np.ascontiguousarray(array, dtype=dtype)


def count_samples(
    num_epochs: int,
    tokens_per_epoch: int,
    seq_length: int,
    drop_last_partial: bool = True,
    add_extra_token: bool = True,
) -> int:
    """Number of samples that `num_epochs` epochs of `tokens_per_epoch` tokens give at `seq_length`."""
    return _C.data.count_samples(num_epochs, tokens_per_epoch, seq_length, int(add_extra_token), drop_last_partial)


def build_sample_index(
    sizes,
    document_index,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial: bool = True,
    add_extra_token: bool = True,
) -> np.ndarray:
    """Start boundary of every sample of a GPT dataset, with Megatron-LM's semantics.

    Samples hold `seq_length + 1` tokens when `add_extra_token` (inputs and shifted labels) and consecutive
    samples overlap by that extra token. Documents are read in `document_index` order (epochs concatenated).

    Args:
        sizes: tokens per document (sequence), indexed by document id.
        document_index: document ids in reading order, int32 or int64.
        seq_length: tokens per sample, without the extra token.
        num_epochs: how many passes over the documents `document_index` holds.
        tokens_per_epoch: tokens in one pass (the sum of `sizes` over one epoch's documents).
        drop_last_partial: drop the last sample when it would be shorter than a full one.
        add_extra_token: whether each sample carries one extra token for the labels.

    Returns:
        `[num_samples + 1, 2]` array (int32, or int64 for huge indices): row j is (position in
        `document_index`, token offset) where sample j starts; row j + 1 is where it ends.
    """
    sizes = _as_index_array("sizes", sizes, np.int32)
    document_index = np.asarray(document_index)
    doc_dtype = np.int32 if document_index.dtype == np.int32 else np.int64
    document_index = _as_index_array("document_index", document_index, doc_dtype)
    return _C.data.build_sample_index(
        sizes,
        document_index,
        int(seq_length),
        int(num_epochs),
        int(tokens_per_epoch),
        bool(drop_last_partial),
        bool(add_extra_token),
    )


def build_blending_index(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset and which of its samples fill each of `size` positions of a weighted blend.

    Position i goes to the dataset whose `weight * max(i, 1)` most exceeds the samples it already has (ties to
    the lowest index), as in Megatron-LM's BlendedDataset.

    Returns:
        `(dataset_index int16[size], dataset_sample_index int64[size])`.
    """
    weights = np.ascontiguousarray(np.asarray(weights, dtype=np.float64))
    if weights.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {weights.shape}")
    return _C.data.build_blending_index(weights, int(size))


def build_exhaustive_blending_index(sizes) -> tuple[np.ndarray, np.ndarray]:
    """A blend that uses every sample of every dataset exactly once, interleaved in proportion to `sizes`.

    Returns:
        `(dataset_index int16[sum(sizes)], dataset_sample_index int64[sum(sizes)])`.
    """
    return _C.data.build_exhaustive_blending_index(_as_index_array("sizes", sizes, np.int64))
