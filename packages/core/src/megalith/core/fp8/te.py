"""The Transformer Engine backend of `apply_fp8`: the block linears become `transformer_engine.pytorch.Linear`.

Optional (`pip install 'megalith-core[te]'`) and not run by Megalith's CI: no machine it runs on has Transformer
Engine. What it does, for each block linear that `fp8_targets` names:

- a `te.Linear` of the same global shape takes its place, in TE's column or row parallel mode on Megalith's tp
  group and with Megalith's sequence-parallel setting (TE then does the all-gather / reduce-scatter itself);
  a fused qkv or gate-up shard keeps its local row order, which TE does not look into;
- its parameters keep the canonical names (`weight`, `bias`) and the placements of the module it replaces, so
  checkpoints are the native backend's and a run can switch backends;
- the model chunk's forward runs inside TE's fp8 autocast with the recipe built from `Fp8Config` (`tensorwise`:
  Float8CurrentScaling, `delayed`: DelayedScaling, `mxfp8`: MXFP8BlockScaling), amaxes reduced over
  `group("tp", "dp")`.

Refused: full recomputation (TE's fp8 state needs TE's own checkpoint function there). Not swapped: the norms
(TE's LayerNormLinear would move the norm's weight into the linear and change its canonical name) and the
attention core (TE's attention draws dropout from TE's own RNG tracker, not the model's). TE keeps its
scaling state (amax histories) inside its modules; Megalith does not checkpoint it, because TE serialises it
with pickle, so a resumed TE run starts its histories afresh.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from megalith.core.fp8.config import Fp8Config
from megalith.core.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalith.core.parallel.mappings import group_size
from megalith.core.placement import placement, set_placement
from megalith.core.recompute import is_recomputed

__all__ = ["apply_te", "import_te", "te_recipe"]

_EXTRA = "pip install 'megalith-core[te]'"
_CLASSES: dict[type, type] = {}


def import_te():
    """(transformer_engine.pytorch, transformer_engine.common.recipe), or an ImportError naming the extra."""
    try:
        te = importlib.import_module("transformer_engine.pytorch")
        recipe = importlib.import_module("transformer_engine.common.recipe")
    except Exception as exc:  # not installed, or installed but failing to load its CUDA libraries
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImportError(
            f"fp8.backend=te needs NVIDIA Transformer Engine, which does not import here ({detail}); {_EXTRA}, "
            f"or use fp8.backend=native"
        ) from exc
    return te, recipe


def te_recipe(config: Fp8Config, recipe_module):
    """The Transformer Engine recipe object for `config`."""
    fmt = recipe_module.Format.HYBRID if config.format == "hybrid" else recipe_module.Format.E4M3
    names = {"tensorwise": "Float8CurrentScaling", "delayed": "DelayedScaling", "mxfp8": "MXFP8BlockScaling"}
    cls = getattr(recipe_module, names[config.recipe], None)
    if cls is None:
        raise ImportError(
            f"fp8.recipe={config.recipe} needs transformer_engine.common.recipe.{names[config.recipe]}, which this "
            f"Transformer Engine lacks; upgrade it ({_EXTRA})"
        )
    if config.recipe == "delayed":
        return cls(margin=config.margin, fp8_format=fmt, amax_history_len=config.amax_history_len,
                   amax_compute_algo=config.amax_compute_algo)  # fmt: skip
    return cls(fp8_format=fmt)


class _TeAutocast:
    """Mixed in before a model chunk's class: its forward runs inside Transformer Engine's fp8 autocast."""

    def forward(self, *args, **kwargs):
        te, recipe, group = self._megalith_te
        with _autocast(te, recipe, group):
            return super().forward(*args, **kwargs)


def _autocast(te, recipe, group):
    if hasattr(te, "fp8_autocast"):
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)
    if hasattr(te, "autocast"):  # the newer name
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return contextlib.nullcontext()  # pragma: no cover - every TE release has one of the two


def apply_te(model: nn.Module, config: Fp8Config, dims, device=None) -> nn.Module:
    """Swaps the block linears of `model` for Transformer Engine modules (see the module docstring); `device` is
    where the model will live (CUDA only)."""
    from megalith.core.fp8.apply import fp8_targets

    te, recipe_module = import_te()
    if any(is_recomputed(layer) for layer in model.layers.values()):
        raise ValueError(
            "fp8.backend=te with runtime.recompute=full is not supported: Transformer Engine's fp8 state needs its "
            "own checkpoint function when a layer is recomputed; use runtime.recompute=selective or none, or "
            "fp8.backend=native"
        )
    where = torch.device(device) if device is not None else next(model.parameters()).device
    where = torch.device("cpu") if where.type == "meta" else where  # built on meta with no device: the CPU
    if where.type != "cuda":
        raise ValueError(f"fp8.backend=te runs on CUDA GPUs only, not {where.type}; use fp8.backend=native there")
    targets = list(fp8_targets(model, config))
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, _te_linear(te, module, name))
    group = dims.group("tp", "dp") if hasattr(dims, "group") else None
    cls = type(model)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TeFp8{cls.__name__}", (_TeAutocast, cls), {"__module__": cls.__module__})
    model.__class__ = _CLASSES[cls]
    model._megalith_te = (te, te_recipe(config, recipe_module), group)
    return model


def _te_linear(te, module: nn.Module, name: str) -> nn.Module:
    """A `te.Linear` standing where `module` stood: same global shape, parallel mode, parameters' placements."""
    weight = module.weight
    kwargs = {}
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and group_size(module.group) > 1:
        mode = "column" if isinstance(module, ColumnParallelLinear) else "row"
        kwargs = dict(tp_group=module.group, tp_size=group_size(module.group), parallel_mode=mode,
                      sequence_parallel=module.sequence_parallel)  # fmt: skip
        in_features, out_features = module.in_features, module.out_features
    else:
        out_features, in_features = weight.shape
    layer = te.Linear(in_features, out_features, bias=module.bias is not None, params_dtype=weight.dtype,
                      device=weight.device, **kwargs)  # fmt: skip
    for pname in ("weight", "bias"):
        source = getattr(module, pname)
        if source is None:
            continue
        target = getattr(layer, pname)
        if tuple(target.shape) != tuple(source.shape):
            raise ValueError(
                f"fp8.backend=te: {name}.{pname} would be {tuple(target.shape)} under Transformer Engine, "
                f"{tuple(source.shape)} in Megalith"
            )
        if not source.is_meta:
            with torch.no_grad():
                target.copy_(source)
        set_placement(layer, pname, placement(module, pname))
    return layer
