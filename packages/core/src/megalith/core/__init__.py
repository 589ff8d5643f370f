"""megalith.core: see packages/core/README.md."""

from __future__ import annotations

from importlib import metadata as _metadata

from megalith.core.build import apply_dropout, build_model_chunks
from megalith.core.compile import apply_compile
from megalith.core.config import PRESETS, ModelConfig, RuntimeConfig, check_tensor_parallel, get_preset
from megalith.core.flops import count_parameters, flops_per_token
from megalith.core.loss import LossConfig, build_loss_fn
from megalith.core.models import Transformer, apply_kernels, init_weights
from megalith.core.parallel import (
    ColumnParallelLinear,
    RNGTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    padded_vocab_size,
    vocab_parallel_cross_entropy,
)
from megalith.core.parallel_dims import ParallelConfig, ParallelDims
from megalith.core.parallelize import apply_tensor_parallel, reduce_sequence_parallel_grads
from megalith.core.placement import Placement, ShardSpec, named_placements
from megalith.core.recompute import apply_recompute
from megalith.core.world import DistributedEnv, destroy_distributed, init_distributed

__version__ = _metadata.version("megalith-core")

__all__ = [
    "PRESETS",
    "ColumnParallelLinear",
    "DistributedEnv",
    "LossConfig",
    "ModelConfig",
    "ParallelConfig",
    "ParallelDims",
    "Placement",
    "RNGTracker",
    "RowParallelLinear",
    "RuntimeConfig",
    "ShardSpec",
    "Transformer",
    "VocabParallelEmbedding",
    "__version__",
    "apply_compile",
    "apply_dropout",
    "apply_kernels",
    "apply_recompute",
    "apply_tensor_parallel",
    "build_loss_fn",
    "build_model_chunks",
    "check_tensor_parallel",
    "count_parameters",
    "destroy_distributed",
    "flops_per_token",
    "get_preset",
    "init_distributed",
    "init_weights",
    "named_placements",
    "padded_vocab_size",
    "reduce_sequence_parallel_grads",
    "vocab_parallel_cross_entropy",
]
