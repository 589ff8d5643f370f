"""Where each parameter lives: its slice of the canonical tensor, and how it is replicated or shared.

This is the one record of parameter placement. Each module keeps a small table for its own direct parameters
(keyed by the local name, e.g. "weight"), written by whatever applied a parallelism (the tensor-parallel layers,
sequence parallelism, the pipeline's tied embedding). The table belongs to the module, not to the Parameter
object, so it survives anything that re-creates parameters (initialisation, FSDP2's `fully_shard`).
Checkpoints, the optimizer, gradient clipping and the gradient reductions read it through `named_placements`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from torch import nn

__all__ = ["REPLICATED", "Placement", "ShardSpec", "named_placements", "placement", "set_placement"]

_TABLE = "_megalith_placements"


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one parameter is laid out across ranks.

    Attributes:
        shard: the local tensor's place in the canonical tensor; None when it is the whole canonical tensor.
        tp_sharded: split over the tensor-parallel group (each tp rank holds different elements); a parameter
            that is not is replicated over tp, and only tp rank 0 counts it in global norms.
        sequence_parallel: replicated over tp, but each tp rank saw only its part of the sequence, so its
            gradient is a partial sum that must be summed over tp.
        shared_embedding: the tied embedding as held by the first and the last pipeline stage; both copies get
            the sum of both gradients, and only the first stage counts it in global norms.
    """

    shard: ShardSpec | None = None
    tp_sharded: bool = False
    sequence_parallel: bool = False
    shared_embedding: bool = False


REPLICATED = Placement()


def placement(module: nn.Module, name: str) -> Placement:
    """The placement of `module`'s own parameter `name` (REPLICATED unless something set it)."""
    return getattr(module, _TABLE, {}).get(name, REPLICATED)


def set_placement(module: nn.Module, name: str, value: Placement | None = None, **changes) -> Placement:
    """Records the placement of `module`'s own parameter `name`: `value`, or the current one with `changes`."""
    if name not in dict(module.named_parameters(recurse=False, remove_duplicate=False)):
        raise KeyError(f"{type(module).__name__} has no parameter {name!r}")
    new = dataclasses.replace(value if value is not None else placement(module, name), **changes)
    table = module.__dict__.setdefault(_TABLE, {})
    table[name] = new
    return new


def named_placements(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Placement]]:
    """(dotted name, parameter, placement) for every parameter of `model`, each parameter once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{name}" if module_name else name), param, placement(module, name)
