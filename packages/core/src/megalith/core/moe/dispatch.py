"""Token dispatch: every (token, slot) assignment travels to its expert and its output comes back to its slot.

Shape legend: T tokens of this rank, k slots per token (top_k), H hidden, E experts in all, E_l experts held here
(a contiguous run: rank r of the ep group holds experts r * E_l .. (r + 1) * E_l - 1), N assignments moved.

Each dispatcher turns hidden states x [T, H], the chosen experts [T, k] and an optional keep mask [T, k]
(capacity) into the experts' outputs per slot, y [T * k, H] (zero for dropped slots), so that weighting and
summing over the k slots happen afterwards in one fixed order whatever the layout:

- `LocalDispatcher` (ep = 1): slots sorted by expert (stable: token order within an expert), one grouped GEMM.
- `AllToAllDispatcher`: slots sorted by expert are also grouped by destination rank; token counts are exchanged
  first, then the rows by `all_to_all` with uneven splits (autograd: the reverse exchange), regrouped from
  (source rank, expert) to (expert, source rank) order for the grouped GEMM, and sent back the same way.
- `AllGatherDispatcher`: every rank gathers all the group's tokens (backward: reduce-scatter), computes the
  slots routed to its own experts, and the slot outputs are reduce-scattered back (each slot is filled by one
  rank, so the sum is exact). More traffic, no uneven exchange: for small ep.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megalith.core.parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
    group_rank,
    group_size,
    reduce_scatter_to_sequence_parallel_region,
)

__all__ = ["AllGatherDispatcher", "AllToAllDispatcher", "LocalDispatcher", "make_dispatcher", "sort_by_expert"]


def sort_by_expert(experts_Tk: torch.Tensor, keep_Tk: torch.Tensor | None, num_experts: int, first: int = 0):
    """Kept slots whose expert is in [first, first + num_experts), sorted by expert, then by slot index.

    Returns:
        (slots [N] indices into the flattened [T * k] assignments, counts [num_experts] slots per expert).
    """
    flat = experts_Tk.reshape(-1)
    mine = (flat >= first) & (flat < first + num_experts)
    if keep_Tk is not None:
        mine &= keep_Tk.reshape(-1)
    slots = mine.nonzero().squeeze(1)
    local = flat[slots] - first
    order = torch.sort(local, stable=True).indices
    return slots[order], torch.bincount(local, minlength=num_experts)


def scatter_slots(y_NH: torch.Tensor, slots_N: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[num_slots, H] holding row n of `y_NH` at slot `slots_N[n]` and zeros elsewhere (differentiable)."""
    out = y_NH.new_zeros((num_slots, y_NH.shape[1]))
    return out.index_copy(0, slots_N, y_NH)


class LocalDispatcher:
    """Every expert is held here (ep = 1)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def __call__(self, x_TH, experts_Tk, keep_Tk, experts: nn.Module) -> torch.Tensor:
        t, k = experts_Tk.shape
        slots, counts = sort_by_expert(experts_Tk, keep_Tk, self.num_experts)
        y_NH = experts(x_TH[slots // k], counts)
        return scatter_slots(y_NH, slots, t * k)


def _regroup_index(recv_RE: torch.Tensor) -> torch.Tensor:
    """Row index taking a buffer laid out in (source rank, expert) chunks to (expert, source rank) order."""
    sizes = recv_RE.reshape(-1)
    starts = (torch.cumsum(sizes, 0) - sizes).view_as(recv_RE)
    sizes_er, starts_er = recv_RE.t().reshape(-1), starts.t().reshape(-1)
    out_starts = torch.cumsum(sizes_er, 0) - sizes_er
    total = int(sizes_er.sum())
    return torch.repeat_interleave(starts_er - out_starts, sizes_er, output_size=total) + torch.arange(
        total, device=recv_RE.device
    )


class AllToAllDispatcher:
    """Experts split over the ep `group`; assignments exchanged by all-to-all with uneven splits."""

    def __init__(self, num_experts: int, group):
        self.ep, self.rank, self.group = group_size(group), group_rank(group), group
        self.num_local = num_experts // self.ep
        self.num_experts = num_experts

    def __call__(self, x_TH, experts_Tk, keep_Tk, experts: nn.Module) -> torch.Tensor:
        t, k = experts_Tk.shape
        slots, counts_E = sort_by_expert(experts_Tk, keep_Tk, self.num_experts)
        send_RE = counts_E.view(self.ep, self.num_local)  # slots for each rank's experts, in rank order
        recv_RE = torch.empty_like(send_RE)
        dist.all_to_all_single(recv_RE, send_RE.contiguous(), group=self.group)
        send_splits, recv_splits = send_RE.sum(1).tolist(), recv_RE.sum(1).tolist()  # sizes must be on the host
        x_recv = all_to_all(x_TH[slots // k], self.group, recv_splits, send_splits)
        index = _regroup_index(recv_RE)
        y_grouped = experts(x_recv[index], recv_RE.sum(0))
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(index.numel(), device=index.device)
        y_NH = all_to_all(y_grouped[inverse], self.group, send_splits, recv_splits)
        return scatter_slots(y_NH, slots, t * k)


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """All ranks' `t` concatenated along dim 0 (no gradient; equal shapes)."""
    parts = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


class AllGatherDispatcher:
    """Experts split over the ep `group`; every rank gathers all the group's tokens (for small ep)."""

    def __init__(self, num_experts: int, group):
        self.ep, self.rank, self.group = group_size(group), group_rank(group), group
        self.num_local = num_experts // self.ep

    def __call__(self, x_TH, experts_Tk, keep_Tk, experts: nn.Module) -> torch.Tensor:
        t, k = experts_Tk.shape
        x_all = gather_from_sequence_parallel_region(x_TH, self.group, seq_dim=0)  # [ep * T, H]
        experts_all = _gather_rows(experts_Tk, self.group)
        keep_all = None if keep_Tk is None else _gather_rows(keep_Tk.to(torch.uint8), self.group).bool()
        slots, counts = sort_by_expert(experts_all, keep_all, self.num_local, first=self.rank * self.num_local)
        y_NH = experts(x_all[slots // k], counts)
        y_all = scatter_slots(y_NH, slots, self.ep * t * k)
        return reduce_scatter_to_sequence_parallel_region(y_all, self.group, seq_dim=0)


def make_dispatcher(kind: str, num_experts: int, group):
    """The dispatcher named `kind` ("alltoall" or "allgather") over ep `group` (LocalDispatcher for one rank)."""
    if group_size(group) == 1:
        return LocalDispatcher(num_experts)
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, group)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, group)
    raise ValueError(f"unknown moe_dispatcher {kind!r}; expected 'alltoall' or 'allgather'")
