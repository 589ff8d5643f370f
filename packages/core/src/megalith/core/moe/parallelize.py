"""Expert parallelism applied from outside the model: each rank keeps its experts (and its slice of each).

`apply_expert_parallel` runs after tensor parallelism (`megalith.core.build` gives the order). For every MoE
layer it keeps the run of experts this rank's ep coordinate owns (rank r of ep: experts r * E/ep ..), splits
each over tp when `expert_tp` is tp (fc1's gate and up rows separately, fc2's columns), records the placement
(`ExpertSpec`: which global experts; the per-expert `ShardSpec`; expert gradients are averaged over the
expert-data-parallel ranks only), and gives the layer its dispatcher and groups. With `expert_tp` = 1 and
tp > 1 every tp rank holds whole experts: under sequence parallelism each computes its own tokens (the expert
gradients are then partial sums over tp), without it every tp rank computes the same.
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.core.config import check_expert_parallel
from megalith.core.moe.dispatch import make_dispatcher
from megalith.core.moe.layer import MoE
from megalith.core.parallel.layers import local_from_canonical, split_parts_spec
from megalith.core.placement import ExpertSpec, Placement, placement, set_placement

__all__ = ["apply_expert_parallel", "moe_layers"]


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE MLPs of `model` (a Transformer or a pipeline stage of one), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(
    model: nn.Module,
    dims,
    *,
    expert_tp: int | None = None,
    sequence_parallel: bool = False,
    dispatcher: str = "alltoall",
) -> nn.Module:
    """Applies ep (and expert tp) of `dims` to every MoE layer of `model`, in place; weights are kept (sliced).

    Args:
        model: a Transformer or a stage of one, tensor parallelism already applied; on meta or materialised.
        dims: the topology (ep and tp groups and coordinates).
        expert_tp: tensor parallelism inside each expert, 1 or dims.tp; None: dims.tp.
        sequence_parallel: whether sequence parallelism splits the tokens over tp.
        dispatcher: "alltoall" or "allgather" (`megalith.core.moe.dispatch`).
    """
    etp = dims.tp if expert_tp is None else expert_tp
    if etp not in (1, dims.tp):
        raise ValueError(f"expert_tp ({etp}) must be 1 or tp ({dims.tp})")
    check_expert_parallel(model.config, dims.ep, etp)
    for moe in moe_layers(model):
        _shard_experts(moe, dims, etp, sequence_parallel and dims.tp > 1)
        moe.dispatcher = make_dispatcher(dispatcher, moe.num_experts, dims.ep_group)
        moe.tp_group, moe.expert_tp = dims.tp_group, etp
        moe.sequence_parallel = sequence_parallel and dims.tp > 1
        moe.cp_group = dims.cp_group if dims.cp > 1 else None
    return model


def _shard_experts(moe: MoE, dims, etp: int, sp: bool) -> None:
    """Keeps this rank's experts (and its slice of each under expert tp) and records their placement."""
    experts, config = moe.experts, moe.config
    num_local = config.num_experts // dims.ep
    first = dims.ep_rank * num_local
    f, h = config.expert_ffn_hidden_size, config.hidden_size
    for name in ("fc1", "fc2"):
        stacked, old = getattr(experts, name), placement(experts, name)
        if old.experts is None or old.experts.first != 0 or old.shard is not None or len(stacked) != config.num_experts:
            raise ValueError("apply_expert_parallel: the experts are already split; apply it to a whole model once")
        spec, local_shape = None, tuple(stacked.shape[1:])
        if etp > 1:
            parts = ([f, f] if experts.swiglu else [f]) if name == "fc1" else [f]
            spec = split_parts_spec(parts, h, etp, dims.tp_rank, dim=0 if name == "fc1" else 1)
            local_shape = (sum(parts) // etp, h) if name == "fc1" else (h, f // etp)
        mine = stacked.detach()[first : first + num_local]
        if stacked.is_meta:
            data = torch.empty((num_local, *local_shape), dtype=stacked.dtype, device="meta")
        else:
            data = torch.stack([local_from_canonical(w, spec, local_shape) for w in mine])
        setattr(experts, name, nn.Parameter(data, requires_grad=stacked.requires_grad))
        set_placement(
            experts, name,
            Placement(shard=spec, tp_sharded=etp > 1, sequence_parallel=etp == 1 and sp,
                      experts=ExpertSpec(config.num_experts, first)),
        )  # fmt: skip
    if sp:
        set_placement(moe.router, "weight", sequence_parallel=True)
