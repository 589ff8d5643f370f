"""Routed experts stacked into two parameters and computed with one grouped GEMM per projection.

Shape legend: N token slots sorted by expert, H hidden, E experts held here, F each expert's inner size (this
rank's part under expert tensor parallelism), F1 = 2F for SwiGLU (gate rows, then up rows), else F.
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.core.config import ModelConfig
from megalith.core.models.ops import TorchOps
from megalith.core.moe.grouped_gemm import GEMM_CHOICES, grouped_mm
from megalith.core.placement import ExpertSpec, set_placement

__all__ = ["GroupedExperts", "apply_expert_gemm"]


class GroupedExperts(nn.Module):
    """E expert MLPs (GeLU or SwiGLU, no biases): `fc1` [E, F1, H] and `fc2` [E, H, F], each expert [out, in].

    Every expert is its own canonical tensor in checkpoints (`layers.{i}.mlp.experts.{e}.fc1.weight`, see
    `megalith.core.placement.expert_name`); expert parallelism keeps a contiguous run of them here, and expert
    tensor parallelism a slice of each (fc1's gate and up rows split separately, fc2's columns).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, f = config.num_experts, config.hidden_size, config.expert_ffn_hidden_size
        self.ops, self.swiglu, self.gemm = TorchOps(), config.activation == "swiglu", "auto"
        self.fc1 = nn.Parameter(torch.empty(e, 2 * f if self.swiglu else f, h))
        self.fc2 = nn.Parameter(torch.empty(e, h, f))
        for name in ("fc1", "fc2"):
            set_placement(self, name, experts=ExpertSpec(num_experts=e, first=0))

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows `counts_E[0]` of `x_NH` through expert 0, the next `counts_E[1]` through expert 1, ...: [N, H]."""
        h_NF1 = self.project(x_NH, self.fc1, counts_E, 0)
        if self.swiglu:
            gate_NF, up_NF = h_NF1.chunk(2, dim=-1)  # under expert tp: this rank's [gate_r; up_r]
            h_NF = self.ops.swiglu(gate_NF, up_NF)
        else:
            h_NF = self.ops.gelu(h_NF1)
        return self.project(h_NF, self.fc2, counts_E, 1)

    def project(self, x_NK: torch.Tensor, w_EMK: torch.Tensor, counts_E: torch.Tensor, which: int) -> torch.Tensor:
        """Row group e of `x_NK` times `w_EMK[e]^T` (`which`: 0 for fc1, 1 for fc2; fp8 overrides this)."""
        return grouped_mm(x_NK, w_EMK.transpose(1, 2), counts_E, self.gemm)


def apply_expert_gemm(model: nn.Module, mode: str) -> nn.Module:
    """How every GroupedExperts of `model` multiplies: "auto", "grouped_mm" or "loop" (`grouped_gemm.grouped_mm`)."""
    if mode not in GEMM_CHOICES:
        raise ValueError(f"moe_gemm must be one of {GEMM_CHOICES}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.gemm = mode
    return model
