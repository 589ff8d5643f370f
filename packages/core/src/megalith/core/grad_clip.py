"""Global gradient-norm clipping that is correct across tensor, pipeline, data and expert parallelism.

Every gradient element of the full model must be counted exactly once (read from each parameter's placement).
Parameters replicated over tp (norm weights, row-parallel biases) are counted on tp rank 0 only; the tied
embedding held by both the first and the last pipeline stage on the first stage only. Squares
are summed over tp and pp, and over the reduction group of ZeRO-1 (cp x ep x dp, `ParallelDims.grad_reduction`)
too when each of those ranks holds only a shard of the gradients. Routed experts differ across ep ranks, so their
squares are always summed over ep (and over cp x dp when sharded). FSDP2 gradients are DTensors sharded over the
dp group: their local shards' squares are always summed over dp, and clipping scales the local shards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megalith.core.parallel_dims import ParallelDims
from megalith.core.placement import Placement, named_placements

__all__ = ["clip_grad_norm_", "global_norm", "is_counted"]


def is_counted(where: Placement, dims: ParallelDims) -> bool:
    """Whether this rank's copy of a parameter placed `where` contributes to the global norm."""
    if not where.tp_sharded and dims.tp_rank != 0:
        return False
    # The tied copy on the last stage carries the same (summed) gradient as the first stage's embedding.
    return not (where.shared_embedding and dims.pp_rank != 0)


def _local_dp_shard(p: torch.Tensor, grad, dims: ParallelDims) -> torch.Tensor:
    """This rank's shard of an FSDP2 gradient, after checking it is sharded over exactly the dp group."""
    mesh, placements = grad.device_mesh, grad.placements
    if mesh.ndim != 1 or mesh.size() != dims.dp or not all(pl.is_shard() for pl in placements):
        raise ValueError(
            f"clip_grad_norm_: a DTensor gradient of shape {tuple(p.shape)} is laid out as {placements} over a "
            f"mesh of {mesh.size()} ranks; only gradients sharded over the data-parallel group ({dims.dp} "
            "ranks, as apply_fsdp2 lays them out) are supported"
        )
    return grad.to_local()


def _sum_over(value: torch.Tensor, dims: ParallelDims, dp_sharded: bool, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """value[0]: dense squares; value[1] (if present): routed experts' squares, which also differ over ep."""
    # Reducing over tp, then pp, then cp x ep x dp covers the whole grid (the groups are orthogonal).
    for size, group in ((dims.tp, dims.tp_group), (dims.pp, dims.pp_group)):
        if size > 1:
            dist.all_reduce(value, op=op, group=group)
    group, size, _ = dims.grad_reduction()
    if dp_sharded and size > 1:  # dense shards over cp x ep x dp; expert shards over cp x dp on each ep rank
        dist.all_reduce(value, op=op, group=group)
    elif value.numel() > 1 and dims.ep > 1:
        experts = value[1:].clone()
        dist.all_reduce(experts, op=op, group=dims.ep_group)
        value[1:] = experts
    return value


def global_norm(
    local_squares: torch.Tensor, dims: ParallelDims, *, dp_sharded: bool, expert_squares: torch.Tensor | None = None
) -> torch.Tensor:
    """The global L2 norm from this rank's sum of squared (counted) gradient elements (an fp32 scalar).

    `expert_squares` are the routed experts' (held by one ep rank each, so summed over ep as well).
    """
    parts = [local_squares] if expert_squares is None else [local_squares, expert_squares]
    total = torch.stack([p.detach().to(torch.float64).reshape(()) for p in parts]).clone()
    return _sum_over(total, dims, dp_sharded).sum().sqrt().to(torch.float32)


def clip_grad_norm_(
    modules: Iterable[torch.nn.Module], max_norm: float | None, dims: ParallelDims, *, dp_sharded: bool = False
) -> torch.Tensor:
    """Scales the gradients (`p.main_grad` when present, else `p.grad`) so their global norm is <= max_norm.

    Args:
        modules: this rank's model chunks (their parameters' placements say what to count).
        max_norm: clipping threshold; None or <= 0 only measures.
        dims: the topology (tp/pp/dp groups and ranks).
        dp_sharded: the gradients are sharded over dp x cp (ZeRO-1) and their norms must be summed over those
            ranks too.

    Returns:
        The global norm before clipping (identical on every rank).
    """
    placed = {id(p): (p, where) for m in modules for _, p, where in named_placements(m)}
    params = [p for p, _ in placed.values()]
    grads = []
    # squares[0]: gradients laid out as `dp_sharded` says; squares[1]: dp-sharded DTensor (FSDP2) gradients;
    # squares[2]: routed experts (laid out as `dp_sharded` says, and different on each ep rank)
    device = params[0].device if params else None
    squares = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(3)]
    has_dtensor = False  # the same on all ranks of a dp group: they hold the same parameters (their shards)
    for p in params:
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        if grad is None:
            continue
        kind = 2 if placed[id(p)][1].experts is not None else 0
        if isinstance(grad, DTensor):
            grad = _local_dp_shard(p, grad, dims)
            has_dtensor, kind = True, 1
        grads.append(grad)
        if is_counted(placed[id(p)][1], dims):
            squares[kind] += grad.detach().double().pow(2).sum()
    if has_dtensor and not dp_sharded and dims.dp > 1:
        dist.all_reduce(squares[1], group=dims.dp_group)  # squares[0] is replicated over dp
    norm = global_norm(squares[0] + squares[1], dims, dp_sharded=dp_sharded, expert_squares=squares[2])
    if max_norm is not None and max_norm > 0:
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm
