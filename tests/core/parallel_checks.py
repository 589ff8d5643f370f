"""Helpers shared by the core tests: tiny configs and gathering tp shards back to canonical tensors."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalith.core import ModelConfig
from megalith.core.parallel.layers import canonical_from_local


def gpt_config(**overrides) -> ModelConfig:
    """GPT-2 style: LayerNorm, GeLU, learned positions, biases, tied embeddings; vocab needs padding."""
    base = dict(
        family="gpt", vocab_size=200, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
        max_seq_len=16, norm="layernorm", activation="gelu", position_embedding="learned", bias=True,
        tie_embeddings=True,
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def llama_config(**overrides) -> ModelConfig:
    """Llama style: RMSNorm, SwiGLU, scaled RoPE, GQA (8 q / 4 kv heads), untied output, odd vocabulary."""
    base = dict(
        family="llama", vocab_size=301, hidden_size=64, num_layers=2, num_attention_heads=8, num_kv_heads=4,
        ffn_hidden_size=96, max_seq_len=16, norm="rmsnorm", activation="swiglu", position_embedding="rope",
        rope_base=500.0, bias=False, tie_embeddings=False,
        rope_scaling={"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8},
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def build(config: ModelConfig, dims=None, *, sequence_parallel: bool = False, runtime=None, seed: int = 1234,
          dtype=None, fp8=None):  # fmt: skip
    """The whole model (pp = 1) for this rank: tp-sharded per `dims`, or alone when `dims` is None."""
    from megalith.core import ParallelConfig, build_model_chunks

    parallel = None if dims is None else ParallelConfig(tp=dims.tp, sequence_parallel=sequence_parallel)
    (model,) = build_model_chunks(config, dims, parallel=parallel, runtime=runtime, fp8=fp8, seed=seed, dtype=dtype)
    return model


def gather_canonical(local: torch.Tensor, spec, group) -> torch.Tensor:
    """The canonical tensor assembled from every tp rank's `local` (placed by each rank's ShardSpec)."""
    if spec is None:
        return local
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return canonical_from_local(local, spec)
    locals_ = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(locals_, local.contiguous(), group=group)
    specs = [None] * size
    dist.all_gather_object(specs, spec, group=group)
    out = local.new_full(spec.global_shape, float("nan"))
    for part, part_spec in zip(locals_, specs, strict=True):
        for local_start, length, global_start in part_spec.pieces:
            out.narrow(spec.dim, global_start, length).copy_(part.narrow(spec.dim, local_start, length))
    assert not torch.isnan(out).any(), "the shards do not cover the canonical tensor"
    return out


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    """Full-vocabulary logits [.., V] from each rank's [.., Vp/tp] shard (padding dropped)."""
    size = 1 if group is None else dist.get_world_size(group)
    if size > 1:
        parts = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]
