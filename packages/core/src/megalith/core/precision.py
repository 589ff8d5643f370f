"""Mixed precision: the parameter/activation dtype of each mode and fp16's dynamic loss scaler.

Modes: fp32; bf16 (bf16 parameters and activations, fp32 main gradients in the DDP buffers and fp32 master
weights in the optimizer); fp16 (the same with fp16, plus a loss scale that keeps small gradients representable:
a step whose gradients contain inf/NaN is skipped and the scale lowered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megalith.core.fields import option

__all__ = ["ConstantLossScaler", "DynamicLossScaler", "PrecisionConfig", "make_loss_scaler"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """Numeric format of training (the dynamic-scaling fields matter only for fp16)."""

    dtype: Literal["fp32", "bf16", "fp16"] = option("fp32", help="Dtype of parameters and activations.")
    initial_loss_scale: float = option(2.0**16, help="fp16: the loss scale to start from.")
    min_loss_scale: float = option(1.0, help="fp16: the scale never drops below this.")
    loss_scale_window: int = option(
        1000, help="fp16: after this many consecutive finite steps the scale is multiplied by growth_factor."
    )
    hysteresis: int = option(
        2, help="fp16: overflowing steps (since the last growth) tolerated before the scale is lowered."
    )
    growth_factor: float = option(2.0, help="fp16: multiplier applied when the scale grows.")
    backoff_factor: float = option(0.5, help="fp16: multiplier applied when the scale is lowered.")

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            hint = " (fp8 is not a parameter dtype: use Fp8Config, the run's fp8.recipe)" if self.dtype == "fp8" else ""
            raise ValueError(f"PrecisionConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}{hint}")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale:
            raise ValueError(
                f"PrecisionConfig: need 0 < min_loss_scale ({self.min_loss_scale}) <= "
                f"initial_loss_scale ({self.initial_loss_scale})"
            )
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ValueError(
                f"PrecisionConfig: loss_scale_window ({self.loss_scale_window}) and hysteresis "
                f"({self.hysteresis}) must be >= 1"
            )
        if not (self.growth_factor > 1.0 and 0.0 < self.backoff_factor < 1.0):
            raise ValueError(
                f"PrecisionConfig: need growth_factor ({self.growth_factor}) > 1 and 0 < backoff_factor "
                f"({self.backoff_factor}) < 1"
            )

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype parameters and activations are kept in."""
        return _DTYPES[self.dtype]


class ConstantLossScaler:
    """A fixed scale (1.0 for bf16/fp32): no skipping logic beyond reporting non-finite gradients."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        """A constant scale ignores overflow (the optimizer still skips a non-finite step)."""

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    """fp16 loss scale: lowered after `hysteresis` overflows, raised after `loss_scale_window` clean steps."""

    def __init__(self, config: PrecisionConfig) -> None:
        self.config = config
        self.scale = float(config.initial_loss_scale)
        self._clean_steps = 0
        self._hysteresis_left = config.hysteresis

    def update(self, found_inf: bool) -> None:
        """Records one step's outcome (found_inf must already agree on every rank)."""
        cfg = self.config
        if found_inf:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * cfg.backoff_factor, cfg.min_loss_scale)
        else:
            self._clean_steps += 1
            if self._clean_steps == cfg.loss_scale_window:
                self._clean_steps = 0
                self._hysteresis_left = cfg.hysteresis
                self.scale *= cfg.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self._clean_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])


def make_loss_scaler(config: PrecisionConfig) -> DynamicLossScaler | ConstantLossScaler:
    """The dynamic scaler for fp16, a constant scale of 1 otherwise."""
    return DynamicLossScaler(config) if config.dtype == "fp16" else ConstantLossScaler(1.0)
