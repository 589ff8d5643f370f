"""Learning-rate (warmup, then constant/linear/cosine/WSD/inverse-sqrt decay) and weight-decay schedules.

Step s counts completed optimizer steps: the update made at step s uses `lr_at(s)`, so warmup's first update
already has a non-zero rate and `lr_at(warmup_steps - 1)` is the peak.
"""

from __future__ import annotations

import math
from typing import Any

from megalith.core.distributed import OptimizerConfig
from megalith.training.config import ScheduleConfig

__all__ = ["ParamScheduler", "lr_at", "weight_decay_at"]


def _warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_fraction is not None:
        return round(cfg.warmup_fraction * total_steps)
    return cfg.warmup_steps


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> float:
    """Learning rate of the update made at optimizer step `step` (0-based)."""
    warmup = _warmup_steps(cfg, total_steps)
    if step < warmup:
        return cfg.warmup_init_lr + (peak_lr - cfg.warmup_init_lr) * (step + 1) / warmup
    min_lr, style = cfg.min_lr, cfg.decay_style
    decay_end = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    if style == "constant":
        return peak_lr
    if style == "inverse-sqrt":
        # Equal to peak_lr at the end of warmup, then proportional to 1 / sqrt(step).
        return max(min_lr, peak_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(step + 1, 1)))
    if style == "wsd":
        decay_len = cfg.wsd_decay_steps or max(1, round(cfg.wsd_decay_fraction * decay_end))
        decay_start = max(warmup, decay_end - decay_len)
        if step < decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start + 1) / max(1, decay_end - decay_start))
        return min_lr + (peak_lr - min_lr) * _wsd_factor(cfg.wsd_decay_style, progress, min_lr / peak_lr)
    span = max(1, decay_end - warmup)
    progress = min(1.0, max(0.0, (step - warmup + 1) / span))
    if style == "linear":
        return peak_lr - (peak_lr - min_lr) * progress
    if style == "cosine":
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.decay_style: unknown style {style!r}")


def _wsd_factor(style: str, progress: float, floor_ratio: float) -> float:
    """Fraction of (peak - min) left after `progress` of the WSD tail (1 at its start, 0 at its end)."""
    if style == "linear":
        return 1.0 - progress
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "minus-sqrt":
        return 1.0 - math.sqrt(progress)
    if style == "exponential":
        # Geometric from peak to max(min, 1e-3 * peak); expressed as a fraction of (peak - min).
        end = max(floor_ratio, 1e-3)
        value = end**progress  # ratio to peak
        return 0.0 if progress >= 1.0 else max(0.0, (value - floor_ratio) / (1.0 - floor_ratio))
    raise ValueError(f"schedule.wsd_decay_style: unknown style {style!r}")


def weight_decay_at(step: int, cfg: ScheduleConfig, base_wd: float, total_steps: int) -> float:
    """Weight decay of the update made at step `step`, moving from weight_decay_start to weight_decay_end."""
    start = base_wd if cfg.weight_decay_start is None else cfg.weight_decay_start
    end = base_wd if cfg.weight_decay_end is None else cfg.weight_decay_end
    if cfg.weight_decay_style == "constant":
        return start
    decay_end = cfg.decay_steps if cfg.decay_steps is not None else total_steps
    progress = min(1.0, step / max(1, decay_end - 1))
    if cfg.weight_decay_style == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ParamScheduler:
    """Sets each param group's `lr` and `weight_decay` before every optimizer step.

    A group may carry `lr_scale` and `wd_scale` (default 1.0); a group created with `weight_decay == 0`
    (norms and biases) keeps zero weight decay unless it sets `wd_scale` itself.

    Args:
        optimizer: any torch optimizer (or object with `param_groups`).
        schedule: the schedule section.
        optimizer_config: peak lr and base weight decay.
        total_steps: the run length in optimizer steps.
    """

    def __init__(
        self, optimizer: Any, schedule: ScheduleConfig, optimizer_config: OptimizerConfig, total_steps: int
    ) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.peak_lr = optimizer_config.lr
        self.base_wd = optimizer_config.weight_decay
        self.total_steps = total_steps
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("lr_scale", 1.0)
            group.setdefault("wd_scale", 0.0 if group.get("weight_decay", 0.0) == 0 else 1.0)
        self.apply()

    @property
    def lr(self) -> float:
        return lr_at(self.step_count, self.schedule, self.peak_lr, self.total_steps)

    @property
    def weight_decay(self) -> float:
        return weight_decay_at(self.step_count, self.schedule, self.base_wd, self.total_steps)

    def apply(self) -> None:
        """Writes the current step's values into the param groups."""
        lr, wd = self.lr, self.weight_decay
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
            group["weight_decay"] = wd * group["wd_scale"]

    def step(self) -> None:
        """Advances by one optimizer step (call after `optimizer.step()`) and sets the next step's values."""
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position; the schedule's shape comes from the current configuration."""
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"scheduler state: 'step' must be a non-negative integer, got {step!r}")
        self.step_count = step
        self.apply()
