"""The training loss, outside the model: per-token cross-entropy of (possibly vocabulary-parallel) logits, plus
the auxiliary terms some layers record during a training forward (the MoE load-balancing and z-losses)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megalith.core.fields import option
from megalith.core.models.ops import get_ops
from megalith.core.models.transformer import IGNORE_INDEX
from megalith.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.core.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megalith.core.parallel.mappings import group_size

__all__ = ["LossConfig", "build_loss_fn", "take_aux_losses"]


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """How the training loss is computed from the logits."""

    label_smoothing: float = option(0.0, help="Weight of the uniform distribution over the vocabulary in the target.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"LossConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


def build_loss_fn(
    model: nn.Module, config: LossConfig | None = None, *, kernels: str = "torch"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`loss(logits [B, S, V], labels [B, S]) -> per-token loss [B, S]` for the logits `model` produces.

    When the output projection is vocabulary-parallel (tensor parallelism), each rank holds a slice of the
    vocabulary and the loss is combined over the tp group; otherwise the whole vocabulary is local. Labels equal
    to -100 give 0. `kernels` picks the op set (as `RuntimeConfig.kernels`).
    """
    config = config or LossConfig()
    out = model.output if model.output is not None else model.embed
    smoothing, vocab_size = config.label_smoothing, model.config.vocab_size
    if isinstance(out, (ColumnParallelLinear, VocabParallelEmbedding)) and group_size(out.group) > 1:
        group, start = out.group, out.vocab_start

        def parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(
                logits, labels, group=group, vocab_start=start, vocab_size=vocab_size, label_smoothing=smoothing,
                ignore_index=IGNORE_INDEX, kernels=kernels,
            )  # fmt: skip

        return parallel_loss
    ops = get_ops(kernels)

    def local_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ops.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)

    return local_loss


def take_aux_losses(model: nn.Module) -> torch.Tensor | None:
    """The sum of the auxiliary loss terms `model`'s layers recorded in its last training forward, cleared.

    Layers that add terms to the objective (the MoE layers: weighted load-balancing and z-losses) keep them
    for the caller, which adds them to the loss it backpropagates with the same scale (the pipeline schedule
    does). None when no layer recorded any (dense models, evaluation, no gradient).
    """
    terms = [t for m in model.modules() if hasattr(m, "take_aux_loss") for t in [m.take_aux_loss()] if t is not None]
    return torch.stack(terms).sum() if terms else None
