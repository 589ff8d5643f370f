"""Where a local (tensor-parallel) shard sits inside its canonical, unsharded tensor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSpec:
    """Placement of a local tensor inside the canonical tensor of shape `global_shape`.

    Along dimension `dim` the local tensor is made of one or more `pieces`, each `(local_start, length,
    global_start)`: local rows `local_start : local_start + length` (indices along `dim`) are canonical rows
    `global_start : global_start + length`. Every other dimension is full. A fused qkv shard has three pieces;
    a padded vocabulary shard has one piece that leaves out the padding rows (which are never saved).
    """

    global_shape: tuple[int, ...]
    dim: int
    pieces: tuple[tuple[int, int, int], ...]
