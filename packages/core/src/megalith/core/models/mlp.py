"""The dense MLP of a transformer block (also a mixture-of-experts layer's shared expert).

Shape legend: B batch, S sequence, H hidden, F inner size (this rank's part under tensor parallelism).
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.core.config import ModelConfig
from megalith.core.models.ops import TorchOps

__all__ = ["MLP"]


class MLP(nn.Module):
    """GeLU MLP (fc1: [F, H]) or SwiGLU (fc1: [2F, H] = gate rows then up rows).

    Args:
        config: the architecture.
        ffn_hidden_size: the inner size F; None: `config.ffn_hidden_size` (a shared expert passes its own).
    """

    def __init__(self, config: ModelConfig, ffn_hidden_size: int | None = None):
        super().__init__()
        self.ops, self.swiglu = TorchOps(), config.activation == "swiglu"
        self.ffn_hidden_size = f = ffn_hidden_size or config.ffn_hidden_size
        self.fc1 = nn.Linear(config.hidden_size, 2 * f if self.swiglu else f, bias=config.bias)
        self.fc2 = nn.Linear(f, config.hidden_size, bias=config.bias)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        h_BSF = self.fc1(x_BSH)
        if self.swiglu:
            gate_BSF, up_BSF = h_BSF.chunk(2, dim=-1)  # under tp: this rank's [gate_r; up_r]
            return self.fc2(self.ops.swiglu(gate_BSF, up_BSF))
        return self.fc2(self.ops.gelu(h_BSF))
