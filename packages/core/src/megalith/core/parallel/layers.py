"""Tensor-parallel building blocks: column- and row-parallel linears and the vocabulary-parallel embedding.

Each layer holds only its local shard and records where it sits in the canonical (full, unpadded) tensor in the
module's placement table (`megalith.core.placement`). `from_module` builds a layer from a full single-device
module, copying the matching slices, so a parallelized model keeps the weights of the model it came from.
Vocabulary layers pad the vocabulary to a multiple of 128 * tp (Megatron's make-vocab-size-divisible-by); their
outputs give padding columns a logit of -inf, so nothing downstream ever predicts them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalith.core.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megalith.core.placement import Placement, ShardSpec, placement, set_placement

VOCAB_MULTIPLE = 128
"""The vocabulary is padded to a multiple of VOCAB_MULTIPLE * tp (Megatron's make-vocab-size-divisible-by)."""


def padded_vocab_size(vocab_size: int, tp: int = 1) -> int:
    """The vocabulary of tensor-parallel vocabulary layers: `vocab_size` rounded up to a multiple of 128 * tp.

    A single-device model (tp == 1) keeps the exact vocabulary.
    """
    if tp == 1:
        return vocab_size
    multiple = VOCAB_MULTIPLE * tp
    return math.ceil(vocab_size / multiple) * multiple


def split_parts_spec(parts: list[int], other: int, tp: int, rank: int, dim: int) -> ShardSpec:
    """ShardSpec of a tensor made of `parts` along `dim` (each part split evenly over tp); `other` = other dim."""
    pieces, local, start = [], 0, 0
    for size in parts:
        chunk = size // tp
        pieces.append((local, chunk, start + rank * chunk))
        local += chunk
        start += size
    shape = (sum(parts), other) if dim == 0 else (other, sum(parts))
    return ShardSpec(global_shape=shape, dim=dim, pieces=tuple(pieces))


def vocab_shard_spec(vocab_size: int, hidden: int, padded: int, tp: int, rank: int) -> ShardSpec:
    """ShardSpec of one rank's rows of a [padded, hidden] vocabulary matrix; padding rows are in no piece."""
    local = padded // tp
    start = rank * local
    length = max(0, min(vocab_size, start + local) - start)
    pieces = ((0, length, start),) if length else ()
    return ShardSpec(global_shape=(vocab_size, hidden), dim=0, pieces=pieces)


def canonical_from_local(local: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """The canonical tensor of a parameter that holds all of it (a single-process parameter)."""
    if spec is None:
        return local
    covered = sum(length for _, length, _ in spec.pieces)
    if covered != spec.global_shape[spec.dim]:
        raise ValueError(f"parameter covers {covered} of {spec.global_shape[spec.dim]} canonical rows")
    out = local.new_empty(spec.global_shape)
    for local_start, length, global_start in spec.pieces:
        out.narrow(spec.dim, global_start, length).copy_(local.narrow(spec.dim, local_start, length))
    return out


def local_from_canonical(full: torch.Tensor, spec: ShardSpec | None, local_shape) -> torch.Tensor:
    """This rank's local tensor cut from the canonical `full`; rows outside every piece (padding) are zero."""
    if spec is None:
        return full.clone()
    if full.is_meta:
        return torch.empty(local_shape, dtype=full.dtype, device="meta")
    out = full.new_zeros(local_shape)
    for local_start, length, global_start in spec.pieces:
        out.narrow(spec.dim, local_start, length).copy_(full.narrow(spec.dim, global_start, length))
    return out


def _new_param(module: nn.Module, name: str, shape, spec, device, dtype, **flags) -> None:
    setattr(module, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
    set_placement(module, name, Placement(shard=spec, **flags))


def mask_padding_columns(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Sets the logits of columns at or past `vocab_size` (global index `vocab_start + j`) to -inf."""
    if vocab_start + logits.shape[-1] <= vocab_size:
        return logits
    columns = torch.arange(logits.shape[-1], device=logits.device) + vocab_start
    return logits.masked_fill(columns >= vocab_size, float("-inf"))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over tp; each rank produces its own slice of y.

    `parts` lists canonical sizes of output blocks that are split separately (qkv: [Nq*D, Nkv*D, Nkv*D];
    SwiGLU fc1: [F, F]), so a rank holds [part0_r; part1_r; ...]. The input gradient is all-reduced over tp
    (copy_to_tp_region) or, under sequence parallelism, the input is all-gathered along the sequence and its
    gradient reduce-scattered.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group=None,
        parts: list[int] | None = None,
        padded_out_features: int | None = None,
        sequence_parallel: bool = False,
        gather_output: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        parts = list(parts) if parts is not None else [out_features]
        if sum(parts) != out_features:
            raise ValueError(f"ColumnParallelLinear: parts {parts} do not add up to out_features {out_features}")
        if padded_out_features is not None and len(parts) > 1:
            raise ValueError("ColumnParallelLinear: padded_out_features works with a single part only")
        if gather_output and len(parts) > 1:
            raise ValueError("ColumnParallelLinear: gather_output would interleave the parts; keep it False")
        for size in parts if padded_out_features is None else ():  # a padded vocabulary splits evenly
            if size % tp:
                raise ValueError(f"ColumnParallelLinear: output part of size {size} is not divisible by tp ({tp})")
        self.group, self.sequence_parallel, self.gather_output = group, sequence_parallel, gather_output
        self.in_features, self.out_features = in_features, out_features
        if padded_out_features is not None:
            if padded_out_features % tp or padded_out_features < out_features:
                raise ValueError(f"ColumnParallelLinear: bad padded_out_features {padded_out_features} for tp {tp}")
            w_spec = vocab_shard_spec(out_features, in_features, padded_out_features, tp, rank)
            local_out = padded_out_features // tp
        else:
            w_spec = split_parts_spec(parts, in_features, tp, rank, dim=0)
            local_out = out_features // tp
        # With padding, logits of padding columns are masked to -inf: this rank's first global column.
        self.vocab_size = out_features if padded_out_features is not None else None
        self.vocab_start = rank * local_out
        _new_param(self, "weight", (local_out, in_features), w_spec, device, dtype, tp_sharded=tp > 1)
        self.bias = None
        if bias:
            b_spec = ShardSpec(global_shape=(w_spec.global_shape[0],), dim=0, pieces=w_spec.pieces)
            _new_param(self, "bias", (local_out,), b_spec, device, dtype, tp_sharded=tp > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        else:
            x = copy_to_tp_region(x, self.group)
        y = self.matmul(x, self.weight, self.bias)
        if self.vocab_size is not None:
            y = mask_padding_columns(y, self.vocab_start, self.vocab_size)
        return gather_from_tp_region(y, self.group) if self.gather_output else y

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's local product `x @ weight^T (+ bias)`; `megalith.core.fp8.apply_fp8` makes it fp8."""
        return F.linear(x, weight, bias)

    @classmethod
    def from_module(cls, linear: nn.Linear, **kwargs) -> ColumnParallelLinear:
        """A column-parallel copy of the full `linear` (its canonical rows); kwargs as for the constructor."""
        w = linear.weight
        spec = placement(linear, "weight").shard
        out_features = spec.global_shape[0] if spec is not None else w.shape[0]
        layer = cls(w.shape[1], out_features, bias=linear.bias is not None, device="meta", dtype=w.dtype, **kwargs)
        _copy_into(layer, linear)
        return layer


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over tp; x arrives split along its last dim.

    The partial products are summed over tp (all-reduce, or reduce-scatter along the sequence under sequence
    parallelism). The bias is replicated and added once, after the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group=None,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        if in_features % tp:
            raise ValueError(f"RowParallelLinear: in_features {in_features} is not divisible by tp ({tp})")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        spec = split_parts_spec([in_features], out_features, tp, rank, dim=1)
        _new_param(self, "weight", (out_features, in_features // tp), spec, device, dtype, tp_sharded=tp > 1)
        self.bias = None
        if bias:
            # Under SP each rank's bias gradient covers its own sequence chunk only: sum over tp.
            _new_param(self, "bias", (out_features,), None, device, dtype, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.group)
        else:
            y = reduce_from_tp_region(y, self.group)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's local product `x @ weight^T (+ bias)`; `megalith.core.fp8.apply_fp8` makes it fp8."""
        return F.linear(x, weight, bias)

    @classmethod
    def from_module(cls, linear: nn.Linear, **kwargs) -> RowParallelLinear:
        w = linear.weight
        layer = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, device="meta", dtype=w.dtype, **kwargs)
        _copy_into(layer, linear)
        return layer


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split over tp; rank r holds rows [r*Vp/tp, (r+1)*Vp/tp).

    Each rank looks up the tokens it owns (zeros for the others) and the results are summed over tp
    (all-reduce; reduce-scatter along the sequence under sequence parallelism). `attend` projects hidden
    states onto this rank's vocabulary rows (tied output layer).
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        *,
        group=None,
        sequence_parallel: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        tp, rank = group_size(group), group_rank(group)
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_size, self.embedding_dim = vocab_size, embedding_dim
        self.padded_vocab_size = padded_vocab_size(vocab_size, tp)
        self.num_local = self.padded_vocab_size // tp
        self.vocab_start = rank * self.num_local
        spec = vocab_shard_spec(vocab_size, embedding_dim, self.padded_vocab_size, tp, rank)
        _new_param(self, "weight", (self.num_local, embedding_dim), spec, device, dtype, tp_sharded=tp > 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_local)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group)
        return reduce_from_tp_region(out, self.group)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary rows for hidden states `x` (the tied output projection)."""
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        else:
            x = copy_to_tp_region(x, self.group)
        return mask_padding_columns(F.linear(x, self.weight), self.vocab_start, self.vocab_size)

    @classmethod
    def from_module(cls, embedding: nn.Module, vocab_size: int, **kwargs) -> VocabParallelEmbedding:
        w = embedding.weight
        layer = cls(vocab_size, w.shape[1], device="meta", dtype=w.dtype, **kwargs)
        _copy_into(layer, embedding)
        return layer


def _copy_into(layer: nn.Module, source: nn.Module) -> None:
    """Fills `layer`'s (meta) parameters with the slices of `source`'s full parameters (same local names)."""
    for name, param in list(layer.named_parameters(recurse=False)):
        src = getattr(source, name)
        full = canonical_from_local(src.data, placement(source, name).shard)
        data = local_from_canonical(full, placement(layer, name).shard, param.shape)
        setattr(layer, name, nn.Parameter(data, requires_grad=src.requires_grad))
