"""`apply_fp8`: the transformer blocks' linear layers switched to fp8, from outside the model.

One step of `build_model_chunks`'s order, after tensor and expert parallelism and recomputation and before the
weights are materialised. The linears of each block (attention qkv and output projection, MLP fc1 and fc2; plain
`nn.Linear` alone, column/row-parallel under tp, fused qkv and gate-up included) run their matmuls in fp8; in a
mixture-of-experts layer, the shared expert's fc1 and fc2 and both projections of the routed experts, each
expert its own fp8 matmul (`fp8_grouped_linear`; recipes tensorwise and rowwise). Everything in
`HIGH_PRECISION_MODULES` keeps the parameter dtype (the router and the shared-expert gate included), as do the
layers `first_layers_in_bf16` and `last_layers_in_bf16` exclude.

The native backend keeps each module and its parameters: only its class is swapped for a subclass whose local
matmul is fp8 (as `apply_recompute` and FSDP2 swap classes), so names, placements and checkpoints are those
of the bf16 model. The chunk gets the scaling state of its fp8 linears as `fp8_scaling`.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from megalith.core.fp8.config import Fp8Config
from megalith.core.fp8.linear import Fp8GroupedExperts, Fp8Matmul, Fp8PlainLinear, LinearCasts
from megalith.core.fp8.state import ChunkScaling
from megalith.core.moe.experts import GroupedExperts
from megalith.core.moe.layer import MoE
from megalith.core.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalith.core.parallel.mappings import group_size

__all__ = ["BLOCK_LINEARS", "EXPERT_RECIPES", "apply_fp8", "fp8_expert_targets", "fp8_targets", "is_fp8"]

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
"""The linears of a transformer block that fp8 applies to (relative names); in a mixture-of-experts layer the
MLP's are the shared expert's (`mlp.shared_expert.fc1`, `.fc2`)."""

EXPERT_RECIPES = ("tensorwise", "rowwise")
"""The recipes the routed experts run in fp8 with (delayed scaling would need an amax history per expert)."""

_CLASSES: dict[type, type] = {}


def _fp8_layers(model: nn.Module, config: Fp8Config):
    num_layers = model.config.num_layers
    for key, layer in model.layers.items():
        if config.in_fp8(layer.layer_id, num_layers):
            yield key, layer


def fp8_targets(model: nn.Module, config: Fp8Config) -> Iterator[tuple[str, nn.Module]]:
    """(canonical name, module) of every linear of `model` (a Transformer or a stage of one) that runs in fp8."""
    for key, layer in _fp8_layers(model, config):
        for path in BLOCK_LINEARS:
            if isinstance(layer.mlp, MoE) and path.startswith("mlp."):
                if layer.mlp.shared_expert is None:
                    continue
                path = path.replace("mlp.", "mlp.shared_expert.")
            module = layer.get_submodule(path)
            if not isinstance(module, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
                raise TypeError(f"fp8: layers.{key}.{path} is a {type(module).__name__}, not a linear layer")
            yield f"layers.{key}.{path}", module


def fp8_expert_targets(model: nn.Module, config: Fp8Config) -> Iterator[tuple[str, MoE]]:
    """(canonical name of the experts, MoE layer) of every mixture-of-experts layer of `model` that runs in fp8."""
    for key, layer in _fp8_layers(model, config):
        if isinstance(layer.mlp, MoE):
            yield f"layers.{key}.mlp.experts", layer.mlp


def is_fp8(module: nn.Module) -> bool:
    """Whether the native backend runs `module`'s matmul in fp8 (a linear, or routed experts)."""
    return isinstance(module, (Fp8Matmul, Fp8GroupedExperts))


def apply_fp8(model: nn.Module, config: Fp8Config | None, dims=None, *, device=None) -> nn.Module:
    """Runs the block linears of `model` in fp8 per `config` (in place; nothing when fp8 is off).

    Args:
        model: a Transformer or a pipeline stage of one, after tensor parallelism (on meta or materialised).
        config: the fp8 section; None or recipe 'none' leaves the model as it is.
        dims: the topology (the Transformer Engine backend takes its tp group from it; None alone).
        device: where the model will live: the native backend keeps its scaling state there (and follows the
            layers if they move); the Transformer Engine backend needs CUDA.

    Returns:
        The model.
    """
    if config is None or not config.enabled:
        return model
    if config.backend == "te":
        from megalith.core.fp8.te import apply_te

        return apply_te(model, config, dims, device)
    targets = list(fp8_targets(model, config))
    experts = list(fp8_expert_targets(model, config))
    if any(is_fp8(module) for _, module in targets) or any(is_fp8(moe.experts) for _, moe in experts):
        raise ValueError("apply_fp8: the model's linears already run in fp8 (apply it once)")
    if experts and config.recipe not in EXPERT_RECIPES:
        raise ValueError(
            f"fp8.recipe={config.recipe} is not supported for the routed experts of a mixture-of-experts model "
            f"({experts[0][0]}): use fp8.recipe={' or '.join(EXPERT_RECIPES)}, or keep those layers out of fp8 "
            "(fp8.first_layers_in_bf16 / last_layers_in_bf16)"
        )
    expert_names = [f"{name}.{proj}" for name, _ in experts for proj in ("fc1", "fc2")]
    state = ChunkScaling(config, [name for name, _ in targets] + expert_names, device)
    for i, (name, moe) in enumerate(experts):
        _fp8_experts(moe, name, state, len(targets) + 2 * i)
    for index, (name, module) in enumerate(targets):
        parallel = isinstance(module, (ColumnParallelLinear, RowParallelLinear))
        group = module.group if parallel and group_size(module.group) > 1 else None
        casts = LinearCasts(
            name, state, index, group=group,
            k_sharded=group is not None and isinstance(module, RowParallelLinear),
            n_sharded=group is not None and isinstance(module, ColumnParallelLinear),
        )  # fmt: skip
        _swap_class(module, Fp8Matmul if parallel else Fp8PlainLinear)
        module.fp8_casts = casts
    model.fp8_scaling = state
    return model


def _swap_class(module: nn.Module, mixin: type) -> None:
    """Makes `module` an instance of a subclass of its class with `mixin` first (one subclass per class)."""
    cls = type(module)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Fp8{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    module.__class__ = _CLASSES[cls]


def _fp8_experts(moe: MoE, name: str, state: ChunkScaling, first: int) -> None:
    """The routed experts of `moe` as fp8 grouped linears, rows `first` (fc1) and `first + 1` (fc2) of `state`.

    Under expert tensor parallelism fc1's output rows and fc2's input columns are split over tp (a column- then
    row-parallel pair): the amaxes spanning them are reduced over the tp group."""
    experts = moe.experts
    if not isinstance(experts, GroupedExperts):
        raise TypeError(f"fp8: {name} is a {type(experts).__name__}, not GroupedExperts")
    group = moe.tp_group if moe.expert_tp > 1 and group_size(moe.tp_group) > 1 else None
    experts.fp8_casts = (
        LinearCasts(f"{name}.fc1", state, first, group=group, k_sharded=False, n_sharded=group is not None),
        LinearCasts(f"{name}.fc2", state, first + 1, group=group, k_sharded=group is not None, n_sharded=False),
    )
    _swap_class(experts, Fp8GroupedExperts)
