"""The process-group view that pipelining, DDP, the optimizer and clipping need, and a small builder for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch.distributed as dist

__all__ = ["Groups", "ParallelGroups", "build_groups", "single_process_groups"]


@runtime_checkable
class ParallelGroups(Protocol):
    """What this package reads from a topology object; `megalith.core.ParallelDims` satisfies it.

    Any object with these attributes works. A group may be None only when its degree is 1 (nothing to talk to).
    Ranks inside a pipeline group must be ordered by pipeline stage (group rank i = stage i).

    Attributes:
        tp_group, pp_group, dp_group: process groups of the tensor-, pipeline- and data-parallel peers.
        tp, pp, dp: the degrees (group sizes).
        tp_rank, pp_rank, dp_rank: this process's rank inside each group.
    """

    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


@dataclass(frozen=True)
class Groups:
    """Explicit process groups (for callers without a ParallelDims); see `ParallelGroups` for the fields."""

    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            size, rank = getattr(self, name), getattr(self, f"{name}_rank")
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"Groups: {name}={size} with {name}_rank={rank} is not a valid degree/rank")
            group = getattr(self, f"{name}_group")
            if group is not None and dist.get_world_size(group) != size:
                raise ValueError(f"Groups: {name}_group has {dist.get_world_size(group)} ranks but {name}={size}")


def single_process_groups() -> Groups:
    """Degrees 1 everywhere: for running the same code in one process (no process group needed)."""
    return Groups(tp_group=None, pp_group=None, dp_group=None)


def build_groups(tp: int = 1, pp: int = 1, dp: int = 1) -> Groups:
    """Builds tp/pp/dp groups over the default world with rank = tp_rank + tp * (dp_rank + dp * pp_rank).

    tp varies fastest and pp slowest (Megatron's default order). Every rank must call this (collective).
    """
    world = dist.get_world_size()
    if tp * pp * dp != world:
        raise ValueError(f"build_groups: tp ({tp}) * pp ({pp}) * dp ({dp}) = {tp * pp * dp} != world size ({world})")
    rank = dist.get_rank()
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)

    def rank_of(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    mine = {}
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for kind, lists in (
        ("tp", [[rank_of(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]),
        ("dp", [[rank_of(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)]),
        ("pp", [[rank_of(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]),
    ):
        for ranks in lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return Groups(
        tp_group=mine["tp"],
        pp_group=mine["pp"],
        dp_group=mine["dp"],
        tp=tp,
        pp=pp,
        dp=dp,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        dp_rank=dp_rank,
    )
