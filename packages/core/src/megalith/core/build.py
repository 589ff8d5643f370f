"""Building this rank's model: a single-device Transformer, then each technique applied from outside, in order.

The order, each step one function (torchtitan's `pipeline_llama` + `parallelize_llama` is the model followed):

1. `Transformer(config)` on the meta device: single-device code, no memory yet;
2. the pipeline split (`keep_stage`): one copy per virtual stage this rank holds, cut down to that stage;
3. for each stage, tensor and sequence parallelism (`apply_tensor_parallel`): column/row-parallel linears,
   vocabulary-parallel embedding and output, sequence-parallel placements;
4. expert parallelism (`apply_expert_parallel`): each MoE layer keeps this rank's experts (a slice of each
   under expert tensor parallelism) and gets its token dispatcher and groups;
5. runtime behaviour: the op set (`apply_kernels`), the experts' GEMM (`apply_expert_gemm`), dropout
   (`apply_dropout`), activation recomputation (`apply_recompute`);
6. materialisation (`init_weights`): every parameter cut from its canonical initial value (each routed expert
   its own), on the target device and dtype; the tied embedding shared between the first and the last stage;
7. data parallelism: the caller wraps each chunk (`DistributedDataParallel`, or `apply_fsdp2`).

"""

from __future__ import annotations

import copy

import torch
from torch import nn

from megalith.core.config import ModelConfig, RuntimeConfig
from megalith.core.models.init import init_weights
from megalith.core.models.ops import apply_kernels
from megalith.core.models.transformer import AttentionCore, Dropout, Transformer
from megalith.core.moe.experts import apply_expert_gemm
from megalith.core.moe.parallelize import apply_expert_parallel
from megalith.core.parallel_dims import ParallelConfig, ParallelDims
from megalith.core.parallelize import apply_tensor_parallel
from megalith.core.pipeline.stages import keep_stage, mark_shared_embedding, split_layers
from megalith.core.recompute import apply_recompute

__all__ = ["apply_dropout", "build_model_chunks"]


class _Alone:
    """The coordinates of a process that holds the whole model by itself (no groups are ever used)."""

    tp = pp = dp = ep = data_parallel_size = 1
    tp_rank = pp_rank = dp_rank = ep_rank = data_rank = 0
    tp_group = pp_group = dp_group = ep_group = data_group = None


_ALONE = _Alone()


def apply_dropout(model: nn.Module, hidden: float = 0.0, attention: float = 0.0) -> nn.Module:
    """Sets the dropout probabilities: `hidden` on the embeddings and residual branches, `attention` on the
    attention probabilities."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.p = hidden
        elif isinstance(module, AttentionCore):
            module.dropout_p = attention
    return model


def build_model_chunks(
    config: ModelConfig,
    dims: ParallelDims | None = None,
    *,
    parallel: ParallelConfig | None = None,
    runtime: RuntimeConfig | None = None,
    seed: int = 0,
    device=None,
    dtype: torch.dtype | None = None,
    empty: bool = False,
) -> list[nn.Module]:
    """This rank's model chunks, one per virtual pipeline stage it holds (in virtual-stage order).

    Args:
        config: the architecture.
        dims: the topology (tp for tensor parallelism; ep for the experts; pp, pp_rank for the stages; the data
            rank for the RNG streams); None builds the whole model for this process alone (also inside a
            distributed job).
        parallel: sequence parallelism, the pipeline split (virtual stages, layers per stage), expert tensor
            parallelism and the MoE dispatcher.
        runtime: kernels, the experts' GEMM, recomputation, dropout.
        seed: weights depend only on it and each parameter's canonical name; dropout streams start from it.
        device, dtype: where and in what precision to create the parameters.
        empty: allocate without drawing initial values (a checkpoint is about to fill them).
    """
    runtime = runtime or RuntimeConfig()
    if dims is None:
        (model,) = build_model_chunks(config, _ALONE, runtime=runtime, seed=seed, device=device, dtype=dtype,
                                      empty=empty)  # fmt: skip
        return [model]
    parallel = parallel or ParallelConfig(tp=dims.tp, pp=dims.pp, ep=dims.ep)
    with torch.device("meta"):
        model = Transformer(config)
    num_stages = dims.pp * parallel.virtual_stages
    layers = split_layers(config.num_layers, num_stages, parallel.layers_per_stage)
    chunks = []
    for chunk in range(parallel.virtual_stages):
        stage = chunk * dims.pp + dims.pp_rank
        part = keep_stage(copy.deepcopy(model), layers[stage], first=stage == 0, last=stage == num_stages - 1)
        apply_tensor_parallel(part, dims, sequence_parallel=parallel.sequence_parallel)
        apply_expert_parallel(part, dims, expert_tp=parallel.expert_tp, sequence_parallel=parallel.sequence_parallel,
                              dispatcher=parallel.moe_dispatcher)  # fmt: skip
        apply_kernels(part, runtime.kernels)
        apply_expert_gemm(part, runtime.moe_gemm)
        apply_dropout(part, runtime.hidden_dropout, runtime.attention_dropout)
        apply_recompute(part, runtime.recompute, runtime.recompute_every)
        part.rng.reset(seed, tp_rank=dims.tp_rank, pp_rank=dims.pp_rank, dp_rank=dims.data_rank,
                       device=device or "cpu")  # fmt: skip
        chunks.append(init_weights(part, seed, device=device, dtype=dtype, empty=empty))
    if dims.pp > 1:
        mark_shared_embedding(chunks, dims)
    return chunks
