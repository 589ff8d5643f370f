"""`Fp8Config`: which fp8 recipe the transformer blocks' linear layers train with, and on which backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megalith.core.fields import option

__all__ = ["HIGH_PRECISION_MODULES", "RECIPES", "Fp8Config"]

RECIPES = ("none", "tensorwise", "delayed", "rowwise", "mxfp8")
_NATIVE_RECIPES = ("tensorwise", "delayed", "rowwise")
_TE_RECIPES = ("tensorwise", "delayed", "mxfp8")

HIGH_PRECISION_MODULES = (
    "the token and position embeddings",
    "the output layer (and the tied embedding it may share)",
    "the MoE router and the shared-expert gate",
    "the norms",
    "the attention core (softmax(q k^T) v)",
)
"""What fp8 never touches: these run in the parameter dtype (bf16 or fp32) whatever the recipe."""


@dataclass(frozen=True, kw_only=True)
class Fp8Config:
    """fp8 matmuls for the linear layers of the transformer blocks (qkv, attention output, MLP in and out).

    Master weights stay fp32 in the optimizer and gradients accumulate in fp32 whatever the recipe; only the
    operands of the linears' matmuls are cast to fp8. Embeddings, the output layer, norms and the attention
    core keep the parameter dtype.
    """

    recipe: Literal["none", "tensorwise", "delayed", "rowwise", "mxfp8"] = option(
        "none",
        help="'none' (no fp8); 'tensorwise': one scale per tensor from its current amax; 'delayed': one scale "
        "per tensor from an amax history of past steps; 'rowwise': one scale per row of activations and per "
        "output row of weights, from the current amaxes (native backend); 'mxfp8': Transformer Engine's MXFP8 "
        "block scaling (backend te, Blackwell).",
    )
    format: Literal["hybrid", "e4m3"] = option(
        "hybrid", help="'hybrid': e4m3 forward operands, e5m2 gradients; 'e4m3': e4m3 everywhere."
    )
    amax_history_len: int = option(16, help="delayed: how many past steps' amaxes each tensor keeps.")
    amax_compute_algo: Literal["max", "most_recent"] = option(
        "max", help="delayed: the scale comes from the largest amax in the history, or the most recent one."
    )
    margin: int = option(
        0, help="Scales are divided by 2**margin, leaving headroom above the amax (every recipe of the native "
        "backend; delayed only under backend te)."
    )  # fmt: skip
    backend: Literal["native", "te"] = option(
        "native",
        help="'native': Megalith's fp8 linears on torch._scaled_mm (or its emulation); 'te': NVIDIA Transformer "
        "Engine modules (pip install 'megalith-core[te]'; not run by Megalith's CI).",
    )
    matmul: Literal["auto", "scaled_mm", "emulated"] = option(
        "auto",
        help="native: 'auto' runs torch._scaled_mm on a GPU where this device and torch build support it and "
        "emulates it elsewhere (with a one-line warning; silently on the CPU, where torch's _scaled_mm is a slow "
        "reference path); 'scaled_mm' always uses _scaled_mm (an error where it cannot run); 'emulated' always "
        "emulates (fp8-rounded operands, fp32 matmul).",
    )
    first_layers_in_bf16: int = option(
        0, help="The first N transformer layers keep their linears in the parameter dtype (bf16), not fp8."
    )
    last_layers_in_bf16: int = option(
        0, help="The last N transformer layers keep their linears in the parameter dtype (bf16), not fp8."
    )

    def __post_init__(self) -> None:
        for name in ("amax_history_len", "margin", "first_layers_in_bf16", "last_layers_in_bf16"):
            value = getattr(self, name)
            low = 1 if name == "amax_history_len" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Fp8Config.{name} must be an integer >= {low}, got {value!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"Fp8Config.recipe must be one of {RECIPES}, got {self.recipe!r}")
        if not self.enabled:
            return
        if self.backend == "native" and self.recipe not in _NATIVE_RECIPES:
            raise ValueError(
                f"Fp8Config.recipe {self.recipe!r} needs backend 'te' (the native backend has {_NATIVE_RECIPES})"
            )
        if self.backend == "te" and self.recipe not in _TE_RECIPES:
            raise ValueError(
                f"Fp8Config.recipe {self.recipe!r} is not a Transformer Engine recipe; with backend 'te' use one "
                f"of {_TE_RECIPES}"
            )
        if self.backend == "te" and self.matmul != "auto":
            raise ValueError(f"Fp8Config.matmul {self.matmul!r} applies to backend 'native' only")

    @property
    def enabled(self) -> bool:
        """Whether any linear runs in fp8."""
        return self.recipe != "none"

    def in_fp8(self, layer_id: int, num_layers: int) -> bool:
        """Whether transformer layer `layer_id` (global index) of a `num_layers`-layer model runs in fp8."""
        return self.enabled and self.first_layers_in_bf16 <= layer_id < num_layers - self.last_layers_in_bf16
