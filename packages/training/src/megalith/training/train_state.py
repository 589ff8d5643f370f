"""What a training checkpoint holds, in canonical form: model tensors and the AdamW state per parameter piece.

Model tensors are `model/NAME` with each parameter's placement (stacked routed experts as one tensor per expert).
The optimizer's fp32 master weights and both moments are `optim/NAME/{master,exp_avg,exp_avg_sq}`: under ZeRO-1 a
rank owns a flat range of each of its (tp-local) parameters, described by `LocalShard(flat_range=...)`, so the
state reshards to any (tp, pp, ep, dp) on load. Scalars (step, Adam step count, scheduler, loss scaler, data
position) go into the checkpoint's JSON `extra`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from megalith.core.checkpoint import OPTIM_PREFIX, LocalShard, model_sharded_state
from megalith.core.checkpoint.state import flat_local_shards
from megalith.core.config import ARCHITECTURE_FIELDS
from megalith.core.distributed import AdamW
from megalith.core.pipeline import unwrap
from megalith.core.placement import named_placements

__all__ = [
    "OPTIMIZER_KEYS",
    "AdamCounters",
    "check_model_config",
    "masters_from_params",
    "model_state",
    "optimizer_state",
]

OPTIMIZER_KEYS = ("master", "exp_avg", "exp_avg_sq")


class AdamCounters:
    """The JSON part of AdamW's resume state (its tensors are saved as canonical shards by `optimizer_state`)."""

    def __init__(self, optimizer: AdamW) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.optimizer.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.step_count = int(state["step"])


def model_state(chunks: Sequence[nn.Module]) -> dict[str, LocalShard]:
    """`model/NAME` -> LocalShard for every parameter of this rank's chunks (canonical names)."""
    state: dict[str, LocalShard] = {}
    for chunk in chunks:
        state.update(model_sharded_state(unwrap(chunk)))
    return state


def optimizer_state(optimizer: AdamW) -> dict[str, LocalShard]:
    """`optim/NAME/KEY` -> the flat piece of the fp32 state this rank's optimizer owns for parameter NAME."""
    placed = {id(p): where for ddp in optimizer.chunks for _, p, where in named_placements(unwrap(ddp))}
    state: dict[str, LocalShard] = {}
    for name, param, start, _length, views in optimizer.param_segments():
        where = placed[id(param)]
        for key in OPTIMIZER_KEYS:  # one entry per canonical tensor (each routed expert its own)
            for canonical, shard in flat_local_shards(name, views[key], start, tuple(param.shape), where).items():
                state[f"{OPTIM_PREFIX}{canonical}/{key}"] = shard
    return state


@torch.no_grad()
def masters_from_params(optimizer: AdamW) -> None:
    """Copies the (just loaded) parameters into the fp32 master weights and clears both moments: a fresh
    optimizer over loaded weights."""
    for _, param, start, length, views in optimizer.param_segments():
        views["master"].copy_(param.detach().reshape(-1)[start : start + length])
        views["exp_avg"].zero_()
        views["exp_avg_sq"].zero_()
    optimizer.step_count = 0


def check_model_config(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Raises ValueError naming every architecture field in which the checkpoint differs from the run."""
    if saved is None:
        return
    diffs = [
        f"{name}: checkpoint {saved.get(name)!r}, config {current[name]!r}"
        for name in ARCHITECTURE_FIELDS
        if name in saved and saved[name] != current[name]
    ]
    if diffs:
        raise ValueError(f"checkpoint {where} does not match the model config: " + "; ".join(diffs))
