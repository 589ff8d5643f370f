"""Sharded state of a model and of a per-parameter torch optimizer under canonical checkpoint keys."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from megalith.core.checkpoint.layout import MODEL_PREFIX, OPTIM_PREFIX
from megalith.core.checkpoint.sharded import LocalShard, read_tensor_metadata
from megalith.core.placement import Placement, canonical_pieces, expert_name, named_placements

__all__ = ["flat_local_shards", "model_sharded_state", "optimizer_sharded_state", "prepare_optimizer_state"]


def model_sharded_state(model: nn.Module) -> dict[str, LocalShard]:
    """ "model/NAME" -> LocalShard for every parameter of an (unwrapped) model.

    Parameter names must be canonical (global layer indices); each parameter's placement gives its slice of
    the canonical tensor. Stacked routed experts become one entry per expert (`placement.expert_name`). Tensors
    shared by several stages (a tied embedding) appear on each of them and are written once.
    """
    return {
        MODEL_PREFIX + canonical: LocalShard(view, pl.shard)
        for name, p, pl in named_placements(model)
        for canonical, view in canonical_pieces(name, p.data, pl)
    }


def flat_local_shards(
    name: str, flat: torch.Tensor, start: int, local_shape: tuple[int, ...], where: Placement
) -> dict[str, LocalShard]:
    """Canonical name -> LocalShard for elements `start : start + len(flat)` of a flattened local parameter.

    A plain parameter gives one flat-range shard; a stack of routed experts gives one per expert the range
    touches, each a flat range of that expert's own (local) tensor.
    """
    end = start + flat.numel()
    if where.experts is None:
        return {name: LocalShard(flat, where.shard, flat_range=(start, end), local_shape=local_shape)}
    per_expert = math.prod(local_shape[1:])
    out = {}
    for e in range(start // per_expert, -(-end // per_expert)):
        lo, hi = max(start, e * per_expert), min(end, (e + 1) * per_expert)
        if lo < hi:
            out[expert_name(name, where.experts.first + e)] = LocalShard(
                flat[lo - start : hi - start], where.shard,
                flat_range=(lo - e * per_expert, hi - e * per_expert), local_shape=tuple(local_shape[1:]),
            )  # fmt: skip
    return out


def optimizer_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, LocalShard]:
    """ "optim/NAME/KEY" -> LocalShard for the per-parameter state of a torch optimizer (e.g. AdamW).

    State tensors shaped like their parameter share its placement; scalar state (e.g. `step`) is replicated.
    Other state is not supported and raises, naming it.
    """
    out: dict[str, LocalShard] = {}
    for name, p, pl in named_placements(model):
        for key, value in optimizer.state.get(p, {}).items():
            full = f"{OPTIM_PREFIX}{name}/{key}"
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {full} is a {type(value).__name__}, not a tensor")
            if value.shape == p.shape:
                for canonical, view in canonical_pieces(name, value, pl):
                    out[f"{OPTIM_PREFIX}{canonical}/{key}"] = LocalShard(view, pl.shard)
            elif value.numel() == 1:
                for canonical, _ in canonical_pieces(name, p, pl):
                    out[f"{OPTIM_PREFIX}{canonical}/{key}"] = LocalShard(value)
            else:
                raise ValueError(f"optimizer state {full} has shape {tuple(value.shape)}, parameter {tuple(p.shape)}")
    return out


def prepare_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: str | os.PathLike) -> int:
    """Creates the state tensors a not-yet-stepped optimizer lacks, shaped as the checkpoint holds them.

    After this, `optimizer_sharded_state` lists every optimizer entry of the checkpoint, ready to be loaded
    in place. Returns the number of tensors created.
    """
    meta = read_tensor_metadata(ckpt_dir)
    by_param: dict[str, dict[str, Any]] = {}
    for key, info in meta.items():
        if key.startswith(OPTIM_PREFIX):
            name, _, state_key = key[len(OPTIM_PREFIX) :].rpartition("/")
            by_param.setdefault(name, {})[state_key] = info
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    created = 0
    for name, p, pl in named_placements(model):
        state = optimizer.state[p]
        names = [canonical for canonical, _ in canonical_pieces(name, p, pl)]
        for state_key, info in next((by_param[n] for n in names if n in by_param), {}).items():
            if state_key in state:
                continue
            if len(info.shape) == 0 or info.shape == (1,):
                device = p.device if fused else torch.device("cpu")
                state[state_key] = torch.zeros(info.shape, dtype=info.dtype, device=device)
            else:
                state[state_key] = torch.zeros_like(p, dtype=info.dtype)
            created += 1
    return created
