"""Where each parameter lives: its slice of the canonical tensor, and how it is replicated or shared.

This is the one record of parameter placement. Each module keeps a small table for its own direct parameters
(keyed by the local name, e.g. "weight"), written by whatever applied a parallelism (the tensor-parallel layers,
sequence parallelism, the pipeline's tied embedding, expert parallelism). The table belongs to the module, not to
the Parameter object, so it survives anything that re-creates parameters (initialisation, FSDP2's `fully_shard`).
Checkpoints, the optimizer, gradient clipping and the gradient reductions read it through `named_placements`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "REPLICATED",
    "ExpertSpec",
    "Placement",
    "ShardSpec",
    "canonical_pieces",
    "expert_name",
    "named_placements",
    "placement",
    "set_placement",
]

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
class ExpertSpec:
    """A parameter that stacks routed experts along dimension 0: local index e is global expert `first + e`.

    Each expert is its own canonical tensor, named by `expert_name`; the placement's `shard` describes one
    expert's slice (its tensor-parallel split), and the parameter's shape is [local experts, *slice shape].
    """

    num_experts: int
    first: int


@dataclasses.dataclass(frozen=True)
class Placement:
    """How one parameter is laid out across ranks.

    Attributes:
        shard: the local tensor's place in the canonical tensor; None when it is the whole canonical tensor.
        tp_sharded: split over the tensor-parallel group (each tp rank holds different elements); a parameter
            that is not is replicated over tp, and only tp rank 0 counts it in global norms.
        sequence_parallel: replicated over tp, but each tp rank saw only its part of the sequence, so its
            gradient is a partial sum that must be summed over tp.
        sequence_parallel: replicated over tp, but each tp rank saw only its part of the sequence (or of the
            attention heads, for the per-head qk-norm weights), so its gradient is a partial sum that must be
            summed over tp.
        shared_embedding: the tied embedding as held by the first and the last pipeline stage; both copies get
            the sum of both gradients, and only the first stage counts it in global norms.
        experts: routed experts stacked along dim 0 (see `ExpertSpec`). Each expert lives on one ep rank, so
            its gradient is averaged over the expert-data-parallel ranks only (`ParallelDims.dp_group`) and
            global norms sum it over ep.
    """

    shard: ShardSpec | None = None
    tp_sharded: bool = False
    sequence_parallel: bool = False
    shared_embedding: bool = False
    experts: ExpertSpec | None = None


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


def expert_name(stacked: str, expert: int) -> str:
    """The canonical name of global expert `expert` of the stacked parameter `stacked`.

    "layers.3.mlp.experts.fc1" (a [local experts, ...] parameter) -> "layers.3.mlp.experts.7.fc1.weight".
    """
    module, _, local = stacked.rpartition(".")
    return f"{module}.{expert}.{local}.weight"


def canonical_pieces(name: str, tensor: torch.Tensor, where: Placement) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, local view) of each canonical tensor a parameter named `name` holds a part of: the
    parameter itself, or, for stacked experts, one view per local expert (whose slice `where.shard` describes)."""
    if where.experts is None:
        yield name, tensor
        return
    for e in range(tensor.shape[0]):
        yield expert_name(name, where.experts.first + e), tensor[e]


def named_placements(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Placement]]:
    """(dotted name, parameter, placement) for every parameter of `model`, each parameter once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{name}" if module_name else name), param, placement(module, name)
