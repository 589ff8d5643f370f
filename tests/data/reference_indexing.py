"""Slow pure-Python index builders written from the format description, used to check the C++ builders.

The sample index is computed in closed form from global token positions (no document walk), so it shares no
structure with the compiled implementation it checks.
"""

from __future__ import annotations

import math

import numpy as np


def reference_sample_index(
    sizes, document_index, seq_length, num_epochs, tokens_per_epoch, drop_last_partial, add_extra_token
):
    """Row j = (position in document_index, offset) where sample j starts.

    Sample j covers global tokens [j*T, j*T + T + x) of the documents concatenated in document_index order.
    Its end boundary is placed just after its last token that is not shared with the next sample: the token at
    global index L = (j+1)*T + x - 1 lies in the first non-empty position p whose range contains it, and the
    boundary is (p, offset_of_L + 1 - x). If the documents end before L, the last sample is partial and the
    boundary is (last position, size of last document - x).
    """
    x = 1 if add_extra_token else 0
    usable = num_epochs * tokens_per_epoch - x
    if usable <= 0:
        num_samples = 0
    else:
        num_samples = usable // seq_length if drop_last_partial else math.ceil(usable / seq_length)
    lengths = [int(sizes[d]) for d in document_index]
    ends = np.cumsum(lengths, dtype=np.int64) if lengths else np.zeros(0, np.int64)
    total = int(ends[-1]) if len(ends) else 0
    rows = [(0, 0)]
    for j in range(1, num_samples + 1):
        last = j * seq_length + x - 1
        if last >= total:
            rows.append((len(document_index) - 1, lengths[-1] - x))
            continue
        position = int(np.searchsorted(ends, last, side="right"))
        start_of_position = int(ends[position]) - lengths[position]
        rows.append((position, last - start_of_position + 1 - x))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def reference_blending_index(weights, size):
    """Greedy proportional interleave, as described for Megatron-LM's BlendedDataset."""
    counts = [0] * len(weights)
    dataset_index, sample_index = [], []
    for i in range(size):
        position = max(i, 1)
        errors = [w * position - c for w, c in zip(weights, counts, strict=True)]
        best = errors.index(max(errors))  # first maximum: ties go to the lowest index
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return np.array(dataset_index, np.int16), np.array(sample_index, np.int64)


def reference_exhaustive_blending_index(sizes):
    """Every sample of every dataset exactly once; weights are sizes / total; exhausted datasets drop out."""
    total = sum(sizes)
    weights = [s / total if total else 0.0 for s in sizes]
    counts = [0] * len(sizes)
    dataset_index, sample_index = [], []
    for i in range(total):
        position = max(i, 1)
        best, best_error = None, None
        for k, (w, c) in enumerate(zip(weights, counts, strict=True)):
            if c >= sizes[k]:
                continue
            error = w * position - c
            if best is None or error > best_error:
                best, best_error = k, error
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return np.array(dataset_index, np.int16), np.array(sample_index, np.int64)
