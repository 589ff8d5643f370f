"""The MoE router, computed in fp32: scores over the experts, a deterministic top-k, and the auxiliary losses.

Shape legend: T tokens (this rank's), E experts, k = top_k, H hidden, B batch, S sequence (this rank's part).

Score functions: "softmax" (probabilities over all experts) or "sigmoid" (an independent score per expert,
DeepSeek-V3). The top k experts are those with the highest score (plus the optional expert bias, which only
chooses and never weighs); ties go to the lower expert index (a stable sort), so every layout and every run
routes alike. The weights of the chosen experts are their scores, normalised to sum to one when
`moe_norm_topk_prob` (softmax: "top-k then softmax", i.e. a softmax over the chosen k as Mixtral computes it;
false: "softmax then top-k", the unnormalised probabilities).

The load-balancing losses are written so that each rank can add its own part when a micro-batch's tokens are
split over ranks (sequence parallelism): token counts are global (summed over the ranks first), score sums are
local, and the loss is a sum of per-rank terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megalith.core.config import ModelConfig

__all__ = [
    "Router",
    "Routing",
    "capacity",
    "keep_mask",
    "sequence_aux_loss",
    "switch_aux_loss",
    "topk_indices",
    "z_loss",
]


@dataclass
class Routing:
    """One routing decision for T tokens."""

    experts_Tk: torch.Tensor
    """Chosen experts (int64), best first."""
    weights_Tk: torch.Tensor
    """fp32 weight of each chosen expert's output."""
    probs_TE: torch.Tensor
    """fp32 normalised scores over every expert (what the load-balancing loss balances)."""
    logits_TE: torch.Tensor
    """fp32 router logits (what the z-loss keeps small)."""


def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring experts per token, best first; equal scores go to the lower expert index."""
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


class Router(nn.Module):
    """Linear scores [E, H] (no bias) computed in fp32, and the optional aux-loss-free expert bias.

    `expert_bias` is a parameter without gradient: it is state a checkpoint keeps, updated after each step by
    `megalith.core.moe.stats.finish_moe_step` (never by the optimizer).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.score_function = config.moe_top_k, config.moe_score_function
        self.norm_topk = config.moe_norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.expert_bias = None
        if config.moe_expert_bias:
            self.expert_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)

    def forward(self, x_TH: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        if self.score_function == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        choose_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias.detach().float()
        experts_Tk = topk_indices(choose_TE.detach(), self.top_k)
        weights_Tk = scores_TE.gather(1, experts_Tk)
        if self.norm_topk:
            weights_Tk = weights_Tk / (
                weights_Tk.sum(-1, keepdim=True) + (1e-20 if self.score_function == "sigmoid" else 0)
            )
        return Routing(experts_Tk, weights_Tk, probs_TE, logits_TE)


def switch_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """This rank's part of the switch load-balancing loss over a micro-batch of `num_tokens` tokens (no coefficient).

    E / (k T^2) * sum_e counts_e * sum_t probs_te, with `counts_E` the micro-batch's tokens per expert (global)
    and the probabilities of this rank's tokens: the parts of all ranks add up to E * sum_e f_e P_e, with f_e
    the fraction of routed slots and P_e the mean probability of expert e (1 when perfectly balanced).
    """
    num_experts = probs_TE.shape[-1]
    scale = num_experts / (top_k * float(num_tokens) ** 2)
    return scale * (counts_E.to(probs_TE.dtype) * probs_TE.sum(0)).sum()


def sequence_aux_loss(probs_BSE: torch.Tensor, counts_BE: torch.Tensor, seq_len: int, top_k: int) -> torch.Tensor:
    """This rank's part of the per-sequence load-balancing loss (the switch loss of each sequence, averaged over
    the B sequences); `counts_BE` are each whole sequence's tokens per expert, `seq_len` its full length."""
    batch, _, num_experts = probs_BSE.shape
    scale = num_experts / (top_k * float(seq_len) ** 2 * batch)
    return scale * (counts_BE.to(probs_BSE.dtype) * probs_BSE.sum(1)).sum()


def z_loss(logits_TE: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """This rank's part of the router z-loss mean_t logsumexp(logits_t)^2 over `num_tokens` tokens."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).sum() / num_tokens


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Slots each expert accepts from a micro-batch of `num_tokens` tokens: ceil(factor * T * k / E)."""
    return math.ceil(factor * num_tokens * top_k / num_experts)


def keep_mask(experts_Tk: torch.Tensor, weights_Tk: torch.Tensor, num_experts: int, cap: int, policy: str):
    """Which (token, slot) assignments their expert accepts when each expert takes at most `cap` of them.

    Policy "probs" keeps each expert's assignments with the highest weight, "position" the earliest; either way
    equal keys go to the earlier token, then the lower slot (the assignment order t * k + j). Returns bool [T, k].
    """
    flat_e = experts_Tk.reshape(-1)
    n = flat_e.numel()
    if policy == "probs":
        order = torch.sort(-weights_Tk.detach().reshape(-1), stable=True).indices
    elif policy == "position":
        order = torch.arange(n, device=flat_e.device)
    else:
        raise ValueError(f"unknown moe_token_drop_policy {policy!r}; expected 'probs' or 'position'")
    order = order[torch.sort(flat_e[order], stable=True).indices]  # by expert, then by the policy's key
    counts = torch.bincount(flat_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(n, device=flat_e.device) - starts[flat_e[order]]
    keep = torch.empty(n, dtype=torch.bool, device=flat_e.device)
    keep[order] = rank_in_expert < cap
    return keep.view_as(experts_Tk)
