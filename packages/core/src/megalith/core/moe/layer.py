"""The mixture-of-experts MLP: router, routed experts behind a dispatcher, optional shared expert.

Shape legend: B batch, S sequence (this rank's part under sequence parallelism), H hidden, T = B * S tokens,
k = top_k, E experts.

Single-device code by default (every expert here, nothing communicated); `apply_expert_parallel` configures the
process groups from outside: the ep group the dispatcher exchanges tokens over, and the tp group when the
experts are tensor-parallel (`expert_tp` = tp: every tp rank computes the same tokens with its slice of each
expert, like a column- then row-parallel MLP) or sequence parallelism splits the tokens.

The layer adds its auxiliary losses (load balancing, z-loss) to the training objective by recording them for the
caller: `take_aux_loss()` returns the last training forward's weighted sum, which the pipeline schedule (or any
training loop, through `megalith.core.loss.take_aux_losses`) adds to the loss it backpropagates. It also
accumulates, per step, the statistics `megalith.core.moe.stats.finish_moe_step` reports and uses for the
expert-bias update. Neither happens while a recomputation replays the forward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megalith.core.config import ModelConfig
from megalith.core.models.mlp import MLP
from megalith.core.moe.dispatch import LocalDispatcher
from megalith.core.moe.experts import GroupedExperts
from megalith.core.moe.router import (
    Router,
    Routing,
    capacity,
    keep_mask,
    sequence_aux_loss,
    switch_aux_loss,
    z_loss,
)
from megalith.core.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megalith.core.parallel.random import RNGTracker

__all__ = ["MoE", "MoEStepStats"]


class MoEStepStats:
    """What one layer saw during a step's training forwards (this rank's tokens; fp64 sums, no gradient)."""

    def __init__(self, num_experts: int, device) -> None:
        self.tokens_E = torch.zeros(num_experts, dtype=torch.float64, device=device)
        """Slots routed to each expert (before any capacity drop)."""
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        """aux-loss term, z-loss term (both with their coefficients), dropped slots, routed slots."""
        self.microbatches = 0


class MoE(nn.Module):
    """Routes each token to its top-k experts and sums their outputs, weighted by the router."""

    def __init__(self, config: ModelConfig, rng: RNGTracker):
        super().__init__()
        self.config, self.rng = config, rng
        self.num_experts, self.top_k = config.num_experts, config.moe_top_k
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        shared = config.moe_shared_expert_ffn_hidden_size
        self.shared_expert = MLP(config, shared) if shared is not None else None
        gate = config.moe_shared_expert_gate
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if gate else None
        # The parallel layout (apply_expert_parallel sets these; the defaults are one device).
        self.dispatcher = LocalDispatcher(config.num_experts)
        self.tp_group, self.expert_tp, self.sequence_parallel = None, 1, False
        self.cp_group = None  # context parallelism: the micro-batch's sequences are split over these ranks too
        self.stats: MoEStepStats | None = None
        self._pending_aux: torch.Tensor | None = None

    def take_aux_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary losses of the last training forward (None if none since the last call)."""
        aux, self._pending_aux = self._pending_aux, None
        return aux

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        b, s, h = x_BSH.shape
        x_TH = x_BSH.reshape(-1, h)
        routing = self.router(x_TH)
        tp, sp = group_size(self.tp_group), self.sequence_parallel and group_size(self.tp_group) > 1
        keep_Tk, keep_e = self._capacity(routing, b, s, sp)
        if self.training and torch.is_grad_enabled():
            # A recomputation must save the same tensors as the forward, so it computes the losses too, but
            # only the forward records them.
            self._aux_losses(routing, keep_Tk, b, s, sp, record=not self.rng.replaying)
        x_e, w_e, experts_e = x_TH, routing.weights_Tk, routing.experts_Tk
        if self.expert_tp > 1:  # every tp rank computes the same tokens with its slice of each expert
            if sp:
                x_e = gather_from_sequence_parallel_region(x_BSH, self.tp_group, seq_dim=1).reshape(-1, h)
                w_e = gather_from_sequence_parallel_region(w_e.view(b, s, -1), self.tp_group, 1).flatten(0, 1)
                experts_e = _gather_sequence(experts_e.view(b, s, -1), self.tp_group).flatten(0, 1)
            else:
                x_e, w_e = copy_to_tp_region(x_TH, self.tp_group), copy_to_tp_region(w_e, self.tp_group)
        y_slots = self.dispatcher(x_e, experts_e, keep_e, self.experts)
        # Weighted sum over the k slots in a fixed order (fp32): the same in every layout.
        out_TH = (y_slots.view(-1, self.top_k, h).float() * w_e.unsqueeze(-1)).sum(1).to(x_BSH.dtype)
        if self.expert_tp > 1:  # partial sums over the expert slices
            if sp:
                out_BSH = reduce_scatter_to_sequence_parallel_region(out_TH.view(b, s * tp, h), self.tp_group, 1)
            else:
                out_BSH = reduce_from_tp_region(out_TH, self.tp_group).view(b, s, h)
        else:
            out_BSH = out_TH.view(b, s, h)
        if self.shared_expert is not None:
            shared_BSH = self.shared_expert(x_BSH)
            if self.shared_expert_gate is not None:
                shared_BSH = shared_BSH * torch.sigmoid(self.shared_expert_gate(x_BSH))
            out_BSH = out_BSH + shared_BSH
        return out_BSH

    def _capacity(self, routing: Routing, b: int, s: int, sp: bool):
        """(keep mask of this rank's tokens, keep mask of the tokens the experts compute here), or (None, None).

        Capacity is per micro-batch of a training forward, so under sequence parallelism the decision is taken on
        the whole sequence (gathered over tp) and each rank keeps its part.
        """
        factor = self.config.moe_capacity_factor
        if factor is None or not self.training:  # evaluation and decoding drop nothing
            return None, None
        experts_Tk, weights_Tk = routing.experts_Tk, routing.weights_Tk.detach()
        if sp:
            experts_Tk = _gather_sequence(experts_Tk.view(b, s, -1), self.tp_group).flatten(0, 1)
            weights_Tk = _gather_sequence(weights_Tk.view(b, s, -1), self.tp_group).flatten(0, 1)
        cap = capacity(experts_Tk.shape[0], self.top_k, self.num_experts, factor)
        keep = keep_mask(experts_Tk, weights_Tk, self.num_experts, cap, self.config.moe_token_drop_policy)
        if not sp:
            return keep, keep
        rank = group_rank(self.tp_group)
        mine = keep.view(b, -1, self.top_k)[:, rank * s : (rank + 1) * s].reshape(-1, self.top_k)
        return mine, (keep if self.expert_tp > 1 else mine)

    def _aux_losses(self, routing: Routing, keep_Tk, b: int, s: int, sp: bool, record: bool) -> None:
        """The weighted auxiliary losses; when `record`, kept for `take_aux_loss` with this micro-batch's
        statistics."""
        c, experts_Tk = self.config, routing.experts_Tk
        counts_E = torch.bincount(experts_Tk.reshape(-1), minlength=self.num_experts)
        # The micro-batch's sequences are split over tp (sequence parallelism) and cp: the losses take the
        # counts of all of its tokens, and each rank's share sums over those ranks to the whole micro-batch's.
        splits = [g for g, on in ((self.tp_group, sp), (self.cp_group, self.cp_group is not None)) if on]
        num_tokens = b * s * math.prod(group_size(g) for g in splits)  # the micro-batch's tokens
        aux = experts_Tk.new_zeros((), dtype=torch.float32)
        if c.moe_aux_loss_coeff > 0:
            if c.moe_aux_loss_type == "micro_batch":
                balance = switch_aux_loss(routing.probs_TE, _sum_over(counts_E, splits), num_tokens, self.top_k)
            else:
                counts_BE = torch.zeros(b, self.num_experts, dtype=torch.int64, device=experts_Tk.device)
                slots_BX = experts_Tk.reshape(b, -1)
                counts_BE.scatter_add_(1, slots_BX, torch.ones_like(slots_BX))
                balance = sequence_aux_loss(routing.probs_TE.view(b, s, -1), _sum_over(counts_BE, splits),
                                            num_tokens // b, self.top_k)  # fmt: skip
            aux = aux + c.moe_aux_loss_coeff * balance
        zl = c.moe_z_loss_coeff * z_loss(routing.logits_TE, num_tokens) if c.moe_z_loss_coeff > 0 else None
        total = aux if zl is None else aux + zl
        if not record:
            return
        self._pending_aux = total if total.requires_grad else None
        if self.stats is None:
            self.stats = MoEStepStats(self.num_experts, experts_Tk.device)
        self.stats.tokens_E += counts_E
        dropped = 0 if keep_Tk is None else (~keep_Tk).sum()
        values = [aux.detach(), 0.0 if zl is None else zl.detach(), dropped, experts_Tk.numel()]
        self.stats.sums += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=experts_Tk.device)
                                        for v in values])  # fmt: skip
        self.stats.microbatches += 1


def _sum_over(t: torch.Tensor, groups: list) -> torch.Tensor:
    """`t` summed over each of `groups` (token counts of sequences split over tp and cp); no gradient."""
    if not groups:
        return t
    t = t.clone()
    for group in groups:
        dist.all_reduce(t, group=group)
    return t


def _gather_sequence(t_BSX: torch.Tensor, group) -> torch.Tensor:
    """[B, S * tp, X]: every tp rank's [B, S, X] part in sequence order (no gradient)."""
    parts = [torch.empty_like(t_BSX) for _ in range(group_size(group))]
    dist.all_gather(parts, t_BSX.contiguous(), group=group)
    return torch.cat(parts, dim=1)
