"""Pipeline stages: which layers each (virtual) stage holds, cutting a model down to one, the tied embedding.

With pp ranks and v model chunks per rank there are pp * v virtual stages; virtual stage s = chunk * pp +
pp_rank holds a contiguous run of layers, so chunk c of rank r feeds chunk c of rank r + 1, and the last rank's
chunk c feeds rank 0's chunk c + 1. The embedding lives on virtual stage 0, the final norm and output projection
on the last one. With tied embeddings the last stage keeps its own copy of the embedding matrix (for the output
projection); both copies are placed `shared_embedding`, start equal, and get the sum of both gradients
(`allreduce_shared_embedding_grads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from megalith.core.parallel_dims import ParallelDims
from megalith.core.placement import named_placements, set_placement

__all__ = [
    "allreduce_shared_embedding_grads",
    "keep_stage",
    "mark_shared_embedding",
    "shared_embedding_param",
    "split_layers",
    "sync_shared_embedding_weights",
    "unwrap",
]

_TAG_SHARED = 1 << 30


def split_layers(num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None) -> list[list[int]]:
    """Global layer indices held by each of `num_stages` (virtual) stages, in order.

    Args:
        num_layers: layers in the model.
        num_stages: pp * virtual stages per rank.
        layers_per_stage: explicit count per stage (must sum to num_layers); default an even split.
    """
    if num_stages < 1:
        raise ValueError(f"split_layers: num_stages must be >= 1, got {num_stages}")
    if layers_per_stage is None:
        if num_layers % num_stages:
            raise ValueError(
                f"num_layers ({num_layers}) is not divisible by the number of pipeline stages ({num_stages}); "
                "pass layers_per_stage to split unevenly"
            )
        counts = [num_layers // num_stages] * num_stages
    else:
        counts = list(layers_per_stage)
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 0:
            raise ValueError(
                f"layers_per_stage {counts} must have {num_stages} non-negative entries summing to "
                f"num_layers ({num_layers})"
            )
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


def keep_stage(model: nn.Module, layer_ids: Sequence[int], *, first: bool, last: bool) -> nn.Module:
    """Cuts a Transformer down, in place, to one pipeline stage: layers `layer_ids`, the embedding on the first
    stage, the final norm and output projection on the last (which keeps the embedding too when it is tied)."""
    keep = {str(i) for i in layer_ids}
    for key in list(model.layers.keys()):
        if key not in keep:
            del model.layers[key]
    if not first:
        model.pos_embed = None
        if not (last and model.config.tie_embeddings):
            model.embed = None
    if not last:
        model.final_norm = None
        model.output = None
    return model


def mark_shared_embedding(chunks: Sequence[nn.Module], dims: ParallelDims) -> None:
    """Places this rank's copy of a tied embedding (first or last stage) as `shared_embedding` and makes the
    last stage's copy equal to the first's (collective on those two stages)."""
    if not unwrap(chunks[0]).config.tie_embeddings:
        return
    owner = _shared_embedding_owner(chunks, dims)
    if owner is not None:
        set_placement(owner[0], owner[1], shared_embedding=True)
    sync_shared_embedding_weights(chunks, dims)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a wrapper that keeps it as `.module` (our DDP), else the module itself."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def _shared_embedding_owner(chunks: Sequence[nn.Module], dims: ParallelDims) -> tuple[nn.Module, str] | None:
    """(module, parameter name) of this rank's copy of the tied embedding, None on ranks holding neither."""
    if dims.pp == 1:
        return None
    if dims.pp_rank == 0:
        model = unwrap(chunks[0])
    elif dims.pp_rank == dims.pp - 1:
        model = unwrap(chunks[-1])
    else:
        return None
    if model.embed is None:
        raise ValueError(f"tied embeddings: pipeline stage {dims.pp_rank} holds no embedding matrix")
    return model.embed, "weight"


def shared_embedding_param(chunks: Sequence[nn.Module], dims: ParallelDims) -> nn.Parameter | None:
    """This rank's copy of the tied embedding: `embed.weight` of the first or of the last stage. None on ranks
    holding neither."""
    owner = _shared_embedding_owner(chunks, dims)
    return None if owner is None else getattr(*owner)


def _peer(dims: ParallelDims) -> int:
    other = dims.pp - 1 if dims.pp_rank == 0 else 0
    return dist.get_global_rank(dims.pp_group, other)


def _exchange(tensor: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Sends `tensor` to the other end (first <-> last stage) and returns what the other end sent."""
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), _peer(dims), tag=_TAG_SHARED),
        dist.P2POp(dist.irecv, received, _peer(dims), tag=_TAG_SHARED),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


def sync_shared_embedding_weights(chunks: Sequence[nn.Module], dims: ParallelDims) -> None:
    """Copies the first stage's embedding into the last stage's tied copy (collective on those two)."""
    param = shared_embedding_param(chunks, dims)
    if param is None:
        return
    with torch.no_grad():
        received = _exchange(param.detach(), dims)
        if dims.pp_rank != 0:
            param.copy_(received)


def allreduce_shared_embedding_grads(chunks: Sequence[nn.Module], dims: ParallelDims) -> None:
    """Sums the tied embedding's gradient (`main_grad`, else `grad`) over the first and the last stage."""
    if dims.pp == 1:
        return
    shared = [p for c in chunks for _, p, where in named_placements(unwrap(c)) if where.shared_embedding]
    if not shared:  # untied, or a middle stage
        return
    param = shared[0]
    grad = getattr(param, "main_grad", None)
    if grad is None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad
    grad.add_(_exchange(grad, dims))
