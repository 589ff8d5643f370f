"""fp8 training: `Fp8Config`, `apply_fp8` (native recipes on torch._scaled_mm, or Transformer Engine) and
`Fp8Training` (the per-step scale update, statistics and resume state a training loop uses)."""

from megalith.core.fp8.apply import BLOCK_LINEARS, apply_fp8, fp8_targets, is_fp8
from megalith.core.fp8.config import HIGH_PRECISION_MODULES, RECIPES, Fp8Config
from megalith.core.fp8.state import FP8_PREFIX, ChunkScaling, Fp8Training

__all__ = [
    "BLOCK_LINEARS",
    "FP8_PREFIX",
    "HIGH_PRECISION_MODULES",
    "RECIPES",
    "ChunkScaling",
    "Fp8Config",
    "Fp8Training",
    "apply_fp8",
    "fp8_targets",
    "is_fp8",
]
