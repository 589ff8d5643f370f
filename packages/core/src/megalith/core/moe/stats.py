"""The end of a step for the MoE layers: their statistics summed over every rank, and the expert-bias update.

Each MoE layer accumulates, over the step's training forwards, its tokens per expert, its weighted auxiliary
losses and its dropped slots (`MoE.stats`, this rank's tokens). `finish_moe_step` sums them over the world in one
all-reduce (a layer's numbers come from the ranks holding it: every tp rank under sequence parallelism, where
each saw part of the tokens, else tp rank 0; every data-parallel rank), clears them, updates the aux-loss-free
expert biases from the global load, and returns what the training loop logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megalith.core.moe.layer import MoE
from megalith.core.pipeline.stages import unwrap

__all__ = ["MoEStepReport", "finish_moe_step"]

_AUX, _Z, _DROPPED, _SLOTS, _MICROBATCHES = range(5)


@dataclass
class MoEStepReport:
    """One step of every MoE layer, over the whole global batch (identical on every rank)."""

    aux_loss: float
    """Load-balancing loss added to the objective: summed over layers, averaged over micro-batches."""
    z_loss: float
    """Router z-loss added to the objective, likewise."""
    dropped_fraction: float | None
    """Routed slots dropped by the capacity limit (None without a capacity factor)."""
    tokens_per_expert: dict[int, list[float]] = field(default_factory=dict)
    """Global layer index -> slots routed to each expert this step."""

    def load_summary(self) -> dict[int, tuple[float, float, float]]:
        """Layer -> (min, max, coefficient of variation) of its tokens per expert."""
        out = {}
        for layer, tokens in self.tokens_per_expert.items():
            mean = sum(tokens) / len(tokens)
            std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / len(tokens))
            out[layer] = (min(tokens), max(tokens), std / mean if mean > 0 else 0.0)
        return out


def _layers(chunks: Sequence[nn.Module]) -> list[tuple[int, MoE]]:
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        for key, layer in model.layers.items():
            if isinstance(layer.mlp, MoE):
                out.append((int(key), layer.mlp))
    return out


@torch.no_grad()
def finish_moe_step(chunks: Sequence[nn.Module], dims=None, *, update_bias: bool = True) -> MoEStepReport | None:
    """Reduces and clears the step's MoE statistics of this rank's chunks; updates the expert biases.

    Collective over the whole world (every rank must call it, MoE layers or not). Call it once per step, after
    the optimizer step; `update_bias=False` (a skipped step) only reports and clears.

    Args:
        chunks: this rank's model chunks (DDP-wrapped or not).
        dims: the topology; None for one process.
        update_bias: move each expert bias by rate * sign(mean load - expert load).

    Returns:
        The report, or None when the model has no MoE layer.
    """
    config = unwrap(chunks[0]).config
    if config.num_experts == 0:
        return None
    layers = _layers(chunks)
    e = config.num_experts
    device = next(unwrap(chunks[0]).parameters()).device
    buf = torch.zeros(config.num_layers, e + 5, dtype=torch.float64, device=device)
    tp_rank, cp_rank = (0, 0) if dims is None else (dims.tp_rank, dims.cp_rank)
    for index, moe in layers:
        stats, moe.stats = moe.stats, None
        if stats is None or not (moe.sequence_parallel or tp_rank == 0):
            continue
        buf[index, :e] = stats.tokens_E  # cp ranks hold different tokens (and shares of the losses): all count
        buf[index, e : e + 4] = stats.sums
        if tp_rank == 0 and cp_rank == 0:  # micro-batches are counted once per data rank
            buf[index, e + _MICROBATCHES] = stats.microbatches
    if dims is not None and dist.is_available() and dist.is_initialized() and dims.world_size > 1:
        dist.all_reduce(buf)
    moe_rows = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    counts = buf[:, e + _MICROBATCHES].clamp(min=1)
    aux = float((buf[moe_rows, e + _AUX] / counts[moe_rows]).sum())
    z = float((buf[moe_rows, e + _Z] / counts[moe_rows]).sum())
    slots = float(buf[:, e + _SLOTS].sum())
    dropped = float(buf[:, e + _DROPPED].sum()) / slots if config.moe_capacity_factor is not None and slots else None
    if config.moe_capacity_factor is not None and dropped is None:
        dropped = 0.0
    if update_bias:
        for index, moe in layers:
            bias = moe.router.expert_bias
            if bias is not None:
                load = buf[index, :e]
                bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=config.moe_expert_bias_rate)
    tokens = {i: buf[i, :e].tolist() for i in moe_rows}
    return MoEStepReport(aux, z, dropped, tokens)
