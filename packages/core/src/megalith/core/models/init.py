"""Initial weights: each parameter drawn from its canonical full tensor, so every layout starts from one model."""

from __future__ import annotations

import math

import torch
from torch import nn

from megalith.core.config import ModelConfig
from megalith.core.parallel.layers import local_from_canonical
from megalith.core.parallel.random import derive_seed
from megalith.core.placement import canonical_pieces, placement

__all__ = ["init_tensor", "init_weights"]

_VOCAB_MATRICES = ("embed.weight", "output.weight")


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, *, device=None, dtype=None, empty: bool = False) -> nn.Module:
    """Materialises every parameter of `model` (a Transformer or a stage of one, possibly on meta) in place.

    Each parameter is cut from its canonical full tensor, drawn from a generator seeded by (seed, name), so the
    weights are the same for every tp / pp layout. Vocabulary padding rows are zero. With `empty`, parameters
    are only allocated (padding rows zero) for a checkpoint to fill.
    """
    config: ModelConfig = model.config
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            full_name = f"{module_name}.{name}" if module_name else name
            where = placement(module, name)
            target_device = device if device is not None else (None if param.is_meta else param.device)
            target_dtype = dtype or (param.dtype if not param.is_meta else torch.get_default_dtype())
            if not param.requires_grad:  # state no optimizer updates (the expert bias) stays fp32
                target_dtype = torch.float32
            if empty:
                local = torch.empty(param.shape, device=target_device, dtype=target_dtype)
                if full_name in _VOCAB_MATRICES:
                    local.zero_()  # vocabulary padding rows are never loaded
            else:
                local = torch.empty(param.shape)
                # One canonical tensor per piece: the parameter, or each routed expert of a stacked one.
                for canonical, view in canonical_pieces(full_name, local, where):
                    spec = where.shard
                    shape = spec.global_shape if spec is not None else tuple(view.shape)
                    view.copy_(local_from_canonical(init_tensor(canonical, shape, config, seed), spec, view.shape))
            module.register_parameter(
                name, nn.Parameter(local.to(device=target_device, dtype=target_dtype), param.requires_grad)
            )
    return model


def init_tensor(name: str, shape, config: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of canonical parameter `name` (float32, CPU)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith((".bias", ".expert_bias")):
        return torch.zeros(shape)
    std = config.init_std
    if name.endswith(("attn.proj.weight", "fc2.weight")):  # the MLP's, each expert's, the shared expert's
        std = std / math.sqrt(2.0 * config.num_layers)  # residual-branch outputs: keep the stream's scale
    generator = torch.Generator().manual_seed(derive_seed(seed, "init", name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)
