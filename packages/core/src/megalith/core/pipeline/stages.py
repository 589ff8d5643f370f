"""Pipeline stage construction: which layers each (virtual) stage holds, and the tied embedding across stages.

With pp ranks and v model chunks per rank there are pp * v virtual stages; virtual stage s = chunk * pp +
pp_rank holds a contiguous run of layers, so chunk c of rank r feeds chunk c of rank r + 1, and the last rank's
chunk c feeds rank 0's chunk c + 1. The embedding lives on virtual stage 0, the head and loss on the last one.
With tied embeddings the last stage holds its own copy of the embedding matrix; both copies are marked
`megalith_shared_embedding`, start equal, and get the sum of both gradients (`allreduce_shared_embedding_grads`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megalith.core.distributed.groups import ParallelGroups

__all__ = [
    "allreduce_shared_embedding_grads",
    "build_stages",
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


def build_stages(
    model_factory: Callable[..., nn.Module],
    num_layers: int,
    groups: ParallelGroups,
    *,
    virtual_stages: int = 1,
    layers_per_stage: Sequence[int] | None = None,
    tie_embeddings: bool = False,
) -> list[nn.Module]:
    """Builds this rank's model chunks (one per virtual stage it holds).

    Args:
        model_factory: called as `model_factory(layer_ids=..., first_stage=..., last_stage=...)`, e.g.
            `functools.partial(Transformer, config, dims)`; returns a module with `embed_tokens`, `layers`
            (ModuleDict keyed by global index), `head` and `loss` as in the model contract.
        num_layers: layers of the whole model.
        groups: the topology (pp, pp_rank, pp_group are used).
        virtual_stages: model chunks per rank (> 1 for the interleaved schedule).
        layers_per_stage: explicit layers per virtual stage (pp * virtual_stages entries, stage order).
        tie_embeddings: whether the output layer reuses the embedding matrix.

    Returns:
        The chunks in virtual-stage order; the tied copies are synchronised from the first stage.
    """
    if virtual_stages < 1 or (virtual_stages > 1 and groups.pp == 1):
        raise ValueError(f"virtual_stages ({virtual_stages}) must be >= 1, and > 1 only with pp > 1 (pp={groups.pp})")
    num_stages = groups.pp * virtual_stages
    per_stage = split_layers(num_layers, num_stages, layers_per_stage)
    chunks = []
    for chunk in range(virtual_stages):
        stage = chunk * groups.pp + groups.pp_rank
        chunks.append(
            model_factory(layer_ids=per_stage[stage], first_stage=stage == 0, last_stage=stage == num_stages - 1)
        )
    if tie_embeddings and groups.pp > 1:
        param = shared_embedding_param(chunks, groups)
        if param is not None:
            param.megalith_shared_embedding = True
        sync_shared_embedding_weights(chunks, groups)
    return chunks


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a wrapper that keeps it as `.module` (our DDP), else the module itself."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def shared_embedding_param(chunks: Sequence[nn.Module], groups: ParallelGroups) -> nn.Parameter | None:
    """This rank's copy of the tied embedding: `embed.weight` of the first stage, or the last stage's copy
    (`output.weight` if the model has one, else `embed.weight`). None on ranks holding neither."""
    if groups.pp == 1:
        return None
    if groups.pp_rank == 0:
        names = ("embed.weight",)
        model = unwrap(chunks[0])
    elif groups.pp_rank == groups.pp - 1:
        names = ("output.weight", "embed.weight")
        model = unwrap(chunks[-1])
    else:
        return None
    params = dict(model.named_parameters())
    for name in names:
        if name in params:
            return params[name]
    raise ValueError(f"tied embeddings: pipeline stage {groups.pp_rank} has none of the parameters {names}")


def _peer(groups: ParallelGroups) -> int:
    other = groups.pp - 1 if groups.pp_rank == 0 else 0
    return dist.get_global_rank(groups.pp_group, other)


def _exchange(tensor: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Sends `tensor` to the other end (first <-> last stage) and returns what the other end sent."""
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), _peer(groups), tag=_TAG_SHARED),
        dist.P2POp(dist.irecv, received, _peer(groups), tag=_TAG_SHARED),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


def sync_shared_embedding_weights(chunks: Sequence[nn.Module], groups: ParallelGroups) -> None:
    """Copies the first stage's embedding into the last stage's tied copy (collective on those two)."""
    param = shared_embedding_param(chunks, groups)
    if param is None:
        return
    with torch.no_grad():
        received = _exchange(param.detach(), groups)
        if groups.pp_rank != 0:
            param.copy_(received)


def allreduce_shared_embedding_grads(chunks: Sequence[nn.Module], groups: ParallelGroups) -> None:
    """Sums the tied embedding's gradient (`main_grad`, else `grad`) over the first and the last stage."""
    param = shared_embedding_param(chunks, groups)
    if param is None or not getattr(param, "megalith_shared_embedding", False):
        return
    grad = getattr(param, "main_grad", None)
    if grad is None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad
    grad.add_(_exchange(grad, groups))
