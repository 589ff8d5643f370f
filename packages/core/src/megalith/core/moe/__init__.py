"""Mixture of experts: the router, token dispatch over expert parallelism, grouped experts, the MoE layer."""

from megalith.core.moe.dispatch import AllGatherDispatcher, AllToAllDispatcher, LocalDispatcher, make_dispatcher
from megalith.core.moe.experts import GroupedExperts, apply_expert_gemm
from megalith.core.moe.grouped_gemm import grouped_mm, grouped_mm_available, looped_mm
from megalith.core.moe.layer import MoE
from megalith.core.moe.parallelize import apply_expert_parallel, moe_layers
from megalith.core.moe.router import Router, Routing, capacity, keep_mask, topk_indices

__all__ = [
    "AllGatherDispatcher",
    "AllToAllDispatcher",
    "GroupedExperts",
    "LocalDispatcher",
    "MoE",
    "Router",
    "Routing",
    "apply_expert_gemm",
    "apply_expert_parallel",
    "capacity",
    "grouped_mm",
    "grouped_mm_available",
    "keep_mask",
    "looped_mm",
    "make_dispatcher",
    "moe_layers",
    "topk_indices",
]
