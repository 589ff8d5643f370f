"""Where a local parameter tensor sits inside its full canonical tensor (read by the checkpoint engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSpec:
    """Placement of a local tensor inside the canonical (full, unpadded) tensor.

    Along dimension `dim` the local tensor is made of one or more pieces `(local_start, length, global_start)`:
    local rows `local_start:local_start+length` are canonical rows `global_start:global_start+length`. Every other
    dimension is full. Local rows covered by no piece (vocabulary padding) have no canonical counterpart.
    """

    global_shape: tuple[int, ...]
    dim: int
    pieces: tuple[tuple[int, int, int], ...]
