"""Sharded state of a model and of a per-parameter torch optimizer under canonical checkpoint keys."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from megalith.core.checkpoint.layout import MODEL_PREFIX, OPTIM_PREFIX
from megalith.core.checkpoint.sharded import LocalShard, read_tensor_metadata
from megalith.core.placement import named_placements

__all__ = ["model_sharded_state", "optimizer_sharded_state", "prepare_optimizer_state"]


def model_sharded_state(model: nn.Module) -> dict[str, LocalShard]:
    """ "model/NAME" -> LocalShard for every parameter of an (unwrapped) model.

    Parameter names must be canonical (global layer indices); each parameter's placement gives its slice of
    the canonical tensor. Tensors shared by several stages (a tied embedding) appear on each of them and are
    written once.
    """
    return {MODEL_PREFIX + name: LocalShard(p.data, pl.shard) for name, p, pl in named_placements(model)}


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
                out[full] = LocalShard(value, pl.shard)
            elif value.numel() == 1:
                out[full] = LocalShard(value)
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
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        for state_key, info in by_param.get(name, {}).items():
            if state_key in state:
                continue
            if len(info.shape) == 0 or info.shape == (1,):
                device = p.device if fused else torch.device("cpu")
                state[state_key] = torch.zeros(info.shape, dtype=info.dtype, device=device)
            else:
                state[state_key] = torch.zeros_like(p, dtype=info.dtype)
            created += 1
    return created
