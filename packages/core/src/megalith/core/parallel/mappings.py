"""Collectives that autograd sees: each is a forward op paired with the backward op its gradient needs.

Every function takes its process group explicitly (`ParallelDims.tp_group`, or `ep_group` for the expert
dispatch); a group of one rank, or None (single process), makes each of them the identity. `seq_dim` / the last
dimension are the dimensions being split or gathered; hidden states in Megalith are [batch, sequence, hidden], so
sequence parallelism works on dim 1 (the expert dispatch gathers and scatters token rows, dim 0).

| function                          | forward                          | backward                          |
|-----------------------------------|----------------------------------|-----------------------------------|
| copy_to_tp_region                 | identity                         | all-reduce (sum)                  |
| reduce_from_tp_region             | all-reduce (sum)                 | identity                          |
| scatter_to_tp_region              | split last dim, keep own chunk   | all-gather last dim               |
| gather_from_tp_region             | all-gather last dim              | split last dim, keep own chunk    |
| scatter_to_sequence_parallel_region | split seq dim, keep own chunk  | all-gather seq dim                |
| gather_from_sequence_parallel_region | all-gather seq dim            | reduce-scatter seq dim            |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter seq dim  | all-gather seq dim                |
| all_to_all                        | all-to-all of rows, uneven splits | the reverse all-to-all           |
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """World size of `group`; None (no torch.distributed) counts as one rank."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} evenly over {size} ranks")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {size} ranks")
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: sum everything, keep own chunk (same result, more traffic).
        full = x.contiguous().clone()
        dist.all_reduce(full, group=group)
        return full.chunk(size, dim=dim)[group_rank(group)].contiguous()
    parts = [p.contiguous() for p in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _check_sequence(x: torch.Tensor, seq_dim: int, group) -> None:
    size = group_size(group)
    if x.shape[seq_dim] % size:
        raise ValueError(
            f"sequence parallelism: the sequence length ({x.shape[seq_dim]}, dim {seq_dim}) is not divisible "
            f"by tp ({size})"
        )


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) of the gradient over the tp group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce (sum) over the tp group. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather the gradient along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather along the last dim. Backward: keep this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """Forward: keep this rank's chunk of the sequence dim. Backward: all-gather the gradient along it."""

    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        _check_sequence(x, seq_dim, group)
        return _split(x, seq_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.seq_dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    """Forward: all-gather along the sequence dim. Backward: reduce-scatter the gradient along it.

    The backward sums because every rank used the full gathered sequence in a tensor-parallel matmul whose
    partial input gradients must be added up.
    """

    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        return _all_gather(x, seq_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.seq_dim, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Forward: reduce-scatter (sum) along the sequence dim. Backward: all-gather the gradient along it."""

    @staticmethod
    def forward(ctx, x, group, seq_dim):
        ctx.group, ctx.seq_dim = group, seq_dim
        _check_sequence(x, seq_dim, group)
        return _reduce_scatter(x, seq_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.seq_dim, ctx.group), None, None


def _all_to_all(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all of rows (rank r sends `input_splits[j]` rows to rank j and receives
    `output_splits[j]` from it). Backward: the reverse all-to-all of the gradient (the splits swapped)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _all_to_all(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def all_to_all(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    """Exchange rows of `x` [N, ...] over `group` with uneven splits (the expert dispatch); differentiable."""
    return x if group_size(group) == 1 else _AllToAll.apply(x, group, list(output_splits), list(input_splits))


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Input of a column-parallel layer: identity forward, all-reduce of the input gradient backward."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Output of a row-parallel layer: all-reduce forward, identity backward."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Split the last dim across tp (forward); all-gather the gradient (backward)."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dim across tp (forward); keep own chunk of the gradient (backward)."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """Split the sequence across tp (forward); all-gather the gradient (backward)."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group, seq_dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """All-gather the sequence across tp (forward); reduce-scatter the gradient (backward)."""
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group, seq_dim)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group, seq_dim: int = 1) -> torch.Tensor:
    """Reduce-scatter the sequence across tp (forward); all-gather the gradient (backward)."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group, seq_dim)
