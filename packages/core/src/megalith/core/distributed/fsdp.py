"""Fully sharded data parallelism (ZeRO-3) through torch's FSDP2 `fully_shard`, as an alternative to our DDP.

Each transformer layer becomes one FSDP unit (its parameters are all-gathered just before its forward and
backward and freed after), then the root module takes the rest (embedding, head). Parameters become DTensors
sharded over a 1-D data-parallel mesh built from the dp group, so tensor parallelism (a separate group) keeps
working inside each layer. Mixed precision follows `PrecisionConfig`: compute in its dtype, fp32 sharded
master parameters, gradients reduced in fp32.

The placements core layers record (tp sharding, sequence parallelism, canonical slices) describe the tp-local
tensor, which FSDP only splits further over dp; they are kept per module, so they survive `fully_shard`
replacing the parameters. With sequence parallelism call `finalize_fsdp2_grads` after backward: it sums the
sequence-parallel parameters' gradient shards over tp.
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.core.parallel_dims import ParallelDims
from megalith.core.parallelize import reduce_sequence_parallel_grads
from megalith.core.placement import named_placements
from megalith.core.precision import PrecisionConfig

__all__ = ["apply_fsdp2", "finalize_fsdp2_grads"]


def apply_fsdp2(
    model: nn.Module,
    dims: ParallelDims,
    precision: PrecisionConfig | None = None,
    *,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shards `model` (fp32 parameters, with a `layers` ModuleDict) over the dp group with FSDP2, in place.

    Args:
        model: the model or pipeline chunk; its parameters must still be fp32 (FSDP keeps them as masters).
        dims: the topology (dp_group is used; dp must be > 1).
        precision: compute dtype (bf16/fp16 cast parameters for compute; fp32 does nothing).
        reshard_after_forward: free gathered layer parameters after forward (ZeRO-3) or keep them until
            backward (ZeRO-2-like, more memory, less communication).

    Returns:
        The same module, now an FSDPModule; after backward its parameters' `.grad` are the dp-averaged shards,
        so a plain `torch.optim.AdamW` over `model.parameters()` is the sharded optimizer.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dims.dp < 2 or dims.dp_group is None:
        raise ValueError(f"apply_fsdp2 needs dp > 1 and a dp_group (dp={dims.dp})")
    if dims.cp > 1:  # FSDP2 would average over dp only, never summing the cp ranks' gradients
        raise ValueError(
            f"apply_fsdp2 does not support context parallelism (cp={dims.cp}); use DistributedDataParallel, "
            "with use_distributed_optimizer for ZeRO-1 over dp x cp"
        )
    if dims.ep > 1 or any(where.experts is not None for _, _, where in named_placements(model)):
        raise ValueError(
            "apply_fsdp2 does not shard mixture-of-experts models (their experts are reduced over other ranks "
            "than the dense weights); use DistributedDataParallel with use_distributed_optimizer (ZeRO-1)"
        )
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise ValueError(f"apply_fsdp2: parameters must be fp32 masters before sharding, found {bad}")
    device_type = next(model.parameters()).device.type
    mesh = DeviceMesh.from_group(dims.dp_group, device_type=device_type)
    compute = (precision or PrecisionConfig()).param_dtype
    policy = MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute, reduce_dtype=torch.float32)
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def finalize_fsdp2_grads(model: nn.Module, dims: ParallelDims) -> None:
    """Sums over tp the gradients of sequence-parallel parameters of an `apply_fsdp2` model.

    Each tp rank saw only its part of the sequence for these replicated weights (norms, row-parallel biases),
    so their gradients are partial sums; FSDP has already averaged them over dp into this rank's dp shard,
    which is the same shard on every tp rank, so one all-reduce of the local shards completes them. Call after
    backward, before clipping and the optimizer step; a no-op without tp.
    """
    if dims.tp > 1:
        reduce_sequence_parallel_grads(model, dims.tp_group)
