"""Applies tensor and sequence parallelism to a single-device Transformer, from outside the model code.

Order: validate the layout against the config, swap each block's linears for column/row-parallel ones (a
mixture-of-experts layer's shared expert too; its routed experts are `apply_expert_parallel`'s), swap the
embedding and output projection for vocabulary-parallel ones, and record in the placement table the parameters
whose gradients need a tp reduction (under sequence parallelism, and the per-head qk-norm weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from megalith.core.config import ModelConfig, check_tensor_parallel
from megalith.core.moe.layer import MoE
from megalith.core.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab_size,
)
from megalith.core.parallel.mappings import group_size, scatter_to_sequence_parallel_region
from megalith.core.placement import named_placements, set_placement


class SequenceShardedEmbedding(nn.Module):
    """A replicated embedding (learned positions) whose output keeps only this rank's sequence chunk."""

    def __init__(self, embedding: nn.Embedding, group):
        super().__init__()
        self.weight, self.group = embedding.weight, group

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [S] (shared by every row) or [B, S] (each row its own) -> this rank's [S/tp, H] or
        [B, S/tp, H]."""
        # The backward all-gathers the gradient, so every rank gets the full, identical weight gradient.
        out = nn.functional.embedding(positions, self.weight)
        return scatter_to_sequence_parallel_region(out, self.group, seq_dim=positions.dim() - 1)


def apply_tensor_parallel(model: nn.Module, dims, *, sequence_parallel: bool = False) -> nn.Module:
    """Applies tp (and sequence parallelism) of `dims` to `model` in place; weights are kept (sliced).

    Works on a materialised model and on one still on the meta device. Returns the model.
    """
    group = dims.tp_group
    if sequence_parallel and dims.tp == 1:
        raise ValueError("sequence parallelism needs tp > 1")
    if dims.tp == 1:
        return model
    check_tensor_parallel(model.config, dims.tp)
    for layer in model.layers.values():
        apply_tensor_parallel_layer(layer, model.config, group, sequence_parallel)
    apply_vocab_parallel(model, group, sequence_parallel)
    return model


def apply_tensor_parallel_layer(layer: nn.Module, config: ModelConfig, group, sequence_parallel: bool) -> None:
    """qkv and fc1 column-parallel (split per part), proj and fc2 row-parallel, local head counts."""
    tp = group_size(group)
    attn, mlp = layer.attn, layer.mlp
    q, kv = config.num_attention_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attn.qkv = ColumnParallelLinear.from_module(
        attn.qkv, group=group, parts=[q, kv, kv], sequence_parallel=sequence_parallel
    )
    attn.proj = RowParallelLinear.from_module(attn.proj, group=group, sequence_parallel=sequence_parallel)
    attn.num_heads, attn.num_kv_heads = config.num_attention_heads // tp, config.num_kv_heads // tp
    if attn.q_norm is not None:  # one weight for all heads, each tp rank holds some heads: partial gradients
        _mark_sequence_parallel(attn.q_norm, attn.k_norm)
    if isinstance(mlp, MoE):
        if mlp.shared_expert is not None:
            _parallel_mlp(mlp.shared_expert, group, sequence_parallel)
        if sequence_parallel and mlp.shared_expert_gate is not None:
            _mark_sequence_parallel(mlp.shared_expert_gate)
    else:
        _parallel_mlp(mlp, group, sequence_parallel)
    if sequence_parallel:
        _mark_sequence_parallel(layer.attn_norm, layer.mlp_norm)
        layer.dropout.stream = "tp"  # the residual stream is sharded: each rank draws its own mask


def _parallel_mlp(mlp: nn.Module, group, sequence_parallel: bool) -> None:
    """fc1 column-parallel (gate and up rows split separately), fc2 row-parallel."""
    f = mlp.ffn_hidden_size
    parts = [f, f] if mlp.swiglu else [f]
    mlp.fc1 = ColumnParallelLinear.from_module(mlp.fc1, group=group, parts=parts, sequence_parallel=sequence_parallel)
    mlp.fc2 = RowParallelLinear.from_module(mlp.fc2, group=group, sequence_parallel=sequence_parallel)


def apply_vocab_parallel(model: nn.Module, group, sequence_parallel: bool) -> None:
    """Embedding and output projection split over the (re-padded) vocabulary; positions scattered under SP."""
    config = model.config
    tp = group_size(group)
    if model.embed is not None:
        model.embed = VocabParallelEmbedding.from_module(
            model.embed, config.vocab_size, group=group, sequence_parallel=sequence_parallel
        )
    if model.output is not None:
        model.output = ColumnParallelLinear.from_module(
            model.output, group=group, padded_out_features=padded_vocab_size(config.vocab_size, tp),
            sequence_parallel=sequence_parallel,
        )  # fmt: skip
    if sequence_parallel:
        if model.pos_embed is not None:
            model.pos_embed = SequenceShardedEmbedding(model.pos_embed, group)
        model.embed_dropout.stream = "tp"
        if model.final_norm is not None:
            _mark_sequence_parallel(model.final_norm)


def _mark_sequence_parallel(*norms: nn.Module) -> None:
    # Each rank sees only its sequence chunk (or its heads), so these replicated parameters' gradients are
    # partial sums.
    for norm in norms:
        for name, p in norm.named_parameters(recurse=False):
            if p is not None:
                set_placement(norm, name, sequence_parallel=True)


def reduce_sequence_parallel_grads(modules: nn.Module | Sequence[nn.Module], group) -> None:
    """Sums over tp the gradients of parameters placed `sequence_parallel`, in one flat all-reduce.

    Each tp rank saw only its part of the sequence for these replicated weights (norms, row-parallel biases
    under sequence parallelism), so their gradients are partial sums. A parameter's gradient is its
    `main_grad` (the fp32 buffer of our DDP wrapper) when it has one, else `.grad` (the local shard when it is a
    DTensor, as under FSDP2, where every tp rank holds the same dp shard). The pipeline's `finalize_grads` and
    `finalize_fsdp2_grads` call this; call it directly only for a model with neither wrapper, and only once.
    """
    if group_size(group) == 1:
        return
    if isinstance(modules, nn.Module):
        modules = [modules]
    grads = []
    for module in modules:
        for _, p, where in named_placements(module):
            if not where.sequence_parallel:
                continue
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            if grad is not None:
                grads.append(grad.to_local() if hasattr(grad, "to_local") else grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
