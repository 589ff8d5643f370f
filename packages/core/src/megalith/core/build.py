"""Building this rank's model: a single-device Transformer, then each technique applied from outside, in order.

The order, each step one function (torchtitan's `pipeline_llama` + `parallelize_llama` is the model followed):

1. `Transformer(config)` on the meta device: single-device code, no memory yet;
2. the pipeline split (`keep_stage`): one copy per virtual stage this rank holds, cut down to that stage;
3. for each stage, tensor and sequence parallelism (`apply_tensor_parallel`): column/row-parallel linears,
   vocabulary-parallel embedding and output, sequence-parallel placements;
4. context parallelism (`apply_context_parallel`): each layer's attention core swapped for ring or all-gather
   attention over the cp group (every other layer is local to the rank's tokens);
5. expert parallelism (`apply_expert_parallel`): each MoE layer keeps this rank's experts (a slice of each
   under expert tensor parallelism) and gets its token dispatcher and groups;
6. runtime behaviour: the op set (`apply_kernels`), the experts' GEMM (`apply_expert_gemm`), dropout
   (`apply_dropout`), activation recomputation (`apply_recompute`);
7. fp8 (`apply_fp8`): the block linears' matmuls in fp8 (native recipes, or Transformer Engine modules);
8. regional compilation (`apply_compile`, with `runtime.compile`): each block runs through torch.compile with
   everything above (parallel linears and their collectives, the op set, the recompute wrapper, fp8 linears)
   inside its graph;
9. materialisation (`init_weights`): every parameter cut from its canonical initial value (each routed expert
   its own), on the target device and dtype; the tied embedding shared between the first and the last stage;
10. data parallelism: the caller wraps each chunk (`DistributedDataParallel`, which reduces dense gradients over
    cp x ep x dp and experts' over cp x dp, or `apply_fsdp2`).

"""

from __future__ import annotations

import copy

import torch
from torch import nn

from megalith.core.compile import apply_compile
from megalith.core.config import ModelConfig, RuntimeConfig
from megalith.core.context_parallel import apply_context_parallel
from megalith.core.fp8 import Fp8Config, apply_fp8
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

    tp = cp = pp = dp = ep = data_parallel_size = 1
    tp_rank = cp_rank = pp_rank = dp_rank = ep_rank = data_rank = 0
    tp_group = cp_group = pp_group = dp_group = ep_group = data_group = None


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
    fp8: Fp8Config | None = None,
    seed: int = 0,
    device=None,
    dtype: torch.dtype | None = None,
    empty: bool = False,
) -> list[nn.Module]:
    """This rank's model chunks, one per virtual pipeline stage it holds (in virtual-stage order).

    Args:
        config: the architecture.
        dims: the topology (tp for tensor parallelism; cp for the sequence split; ep for the experts; pp, pp_rank
            for the stages; the data and cp ranks for the RNG streams); None builds the whole model for this
            process alone (also inside a distributed job).
        parallel: sequence parallelism, the context-parallel exchange (`cp_comm`), the pipeline split (virtual
            stages, layers per stage), expert tensor parallelism and the MoE dispatcher.
        runtime: kernels, the experts' GEMM, recomputation, dropout, compilation.
        fp8: fp8 linears (None: none).
        seed: weights depend only on it and each parameter's canonical name; dropout streams start from it.
        device, dtype: where and in what precision to create the parameters.
        empty: allocate without drawing initial values (a checkpoint is about to fill them).
    """
    runtime = runtime or RuntimeConfig()
    if fp8 is not None and fp8.enabled and dtype == torch.float16:
        raise ValueError(f"fp8 (recipe {fp8.recipe}) with float16 parameters is not supported: use bfloat16 or float32")
    if config.num_experts and fp8 is not None and fp8.enabled and fp8.backend == "te":
        raise ValueError(
            f"fp8.backend=te with a mixture-of-experts model (num_experts={config.num_experts}) is not supported: "
            "Megalith swaps only dense linears for Transformer Engine modules; use fp8.backend=native (recipes "
            "tensorwise or rowwise for the experts)"
        )
    if config.num_experts and runtime.compile:
        raise ValueError(
            f"runtime.compile with a mixture-of-experts model (num_experts={config.num_experts}) is not supported "
            "yet: token routing has data-dependent shapes that a fullgraph block cannot hold; set runtime.compile "
            "to false"
        )
    if dims is None:
        (model,) = build_model_chunks(config, _ALONE, runtime=runtime, fp8=fp8, seed=seed, device=device,
                                      dtype=dtype, empty=empty)  # fmt: skip
        return [model]
    parallel = parallel or ParallelConfig(tp=dims.tp, cp=dims.cp, pp=dims.pp, ep=dims.ep)
    if dims.cp > 1 and runtime.attention_dropout > 0:
        raise ValueError(
            f"runtime.attention_dropout ({runtime.attention_dropout}) must be 0 under context parallelism "
            f"(cp={dims.cp}): the attention kernel has no dropout"
        )
    if dims.cp > 1 and runtime.compile:
        raise ValueError(
            f"runtime.compile with context parallelism (cp={dims.cp}) is not supported: the ring and all-gather "
            "exchanges are not traceable inside a fullgraph block; set runtime.compile to false"
        )
    if dims.cp > 1 and config.num_experts and config.moe_capacity_factor is not None:
        raise ValueError(
            f"model.moe_capacity_factor ({config.moe_capacity_factor}) with context parallelism (cp={dims.cp}) is "
            "not supported: capacity is decided over a micro-batch's whole sequences, which cp splits; drop no "
            "tokens (moe_capacity_factor null) or use cp=1"
        )
    with torch.device("meta"):
        model = Transformer(config)
    num_stages = dims.pp * parallel.virtual_stages
    layers = split_layers(config.num_layers, num_stages, parallel.layers_per_stage)
    chunks = []
    for chunk in range(parallel.virtual_stages):
        stage = chunk * dims.pp + dims.pp_rank
        part = keep_stage(copy.deepcopy(model), layers[stage], first=stage == 0, last=stage == num_stages - 1)
        apply_tensor_parallel(part, dims, sequence_parallel=parallel.sequence_parallel)
        apply_context_parallel(part, dims, comm=parallel.cp_comm)
        apply_expert_parallel(part, dims, expert_tp=parallel.expert_tp, sequence_parallel=parallel.sequence_parallel,
                              dispatcher=parallel.moe_dispatcher)  # fmt: skip
        apply_kernels(part, runtime.kernels)
        apply_expert_gemm(part, runtime.moe_gemm)
        apply_dropout(part, runtime.hidden_dropout, runtime.attention_dropout)
        apply_recompute(part, runtime.recompute, runtime.recompute_every)
        apply_fp8(part, fp8, dims, device=device)
        if runtime.compile:
            apply_compile(part)
        # Data shards and cp ranks hold different tokens, so each gets its own dropout stream.
        stream = dims.data_rank * dims.cp + dims.cp_rank
        part.rng.reset(seed, tp_rank=dims.tp_rank, pp_rank=dims.pp_rank, dp_rank=stream, device=device or "cpu")
        chunks.append(init_weights(part, seed, device=device, dtype=dtype, empty=empty))
    if dims.pp > 1:
        mark_shared_embedding(chunks, dims)
    return chunks
