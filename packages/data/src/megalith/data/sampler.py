"""Data-parallel batch sampling that resumes exactly from a consumed-sample count."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["PretrainingSampler", "collate"]


class PretrainingSampler:
    """Yields this rank's micro-batches of dataset indices, in order, one global batch after another.

    Global batch g holds samples [g * global_batch_size, (g + 1) * global_batch_size) of the dataset. It is cut
    into `global_batch_size / (micro_batch_size * dp)` steps; at each step rank r takes the r-th run of
    `micro_batch_size` samples. Only whole global batches are served, so `consumed_samples` (the samples every
    rank together has used, as saved in a checkpoint) must be a multiple of global_batch_size.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size ({global_batch_size}) is not divisible by micro_batch_size * dp "
                f"({micro_batch_size} * {dp_size})"
            )
        if consumed_samples % global_batch_size or consumed_samples < 0:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be a non-negative multiple of global_batch_size "
                f"({global_batch_size})"
            )
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples ({consumed_samples}) exceeds total_samples ({total_samples})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank in one global batch (gradient-accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def __len__(self) -> int:
        remaining = (self.total_samples - self.consumed_samples) // self.global_batch_size
        return remaining * self.num_micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        begin = self.consumed_samples
        last = self.consumed_samples + (len(self) // self.num_micro_batches) * self.global_batch_size
        while begin < last:
            first = begin + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            begin += step


def collate(items: list[dict]) -> dict[str, np.ndarray]:
    """Stacks a list of item dicts into a dict of [B, ...] arrays."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    return {key: np.stack([np.asarray(item[key]) for item in items]) for key in items[0]}
