"""AdamW over the DDP gradient buffers, with fp32 master weights, optionally sharded over dp (ZeRO-1).

For every bucket of every model chunk the optimizer owns a flat range of the buffers: the whole bucket, or
with `use_distributed_optimizer` this rank's 1/dp shard of it. For that range it keeps fp32 master weights and
both Adam moments; a step unscales and checks the gradients (fp16), clips with the global norm, updates the
range and writes it back into the (possibly low-precision) parameters; sharded, each bucket is then
all-gathered so every dp rank holds all updated parameters again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from megalith.core.distributed.ddp import DistributedDataParallel, all_gather_into
from megalith.core.fields import option
from megalith.core.grad_clip import any_nonfinite, global_norm, is_counted
from megalith.core.parallel_dims import ParallelDims
from megalith.core.placement import named_placements
from megalith.core.precision import ConstantLossScaler, DynamicLossScaler

__all__ = ["AdamW", "OptimizerConfig", "StepResult"]


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW hyper-parameters (torch.optim.AdamW semantics: decoupled weight decay) and gradient clipping."""

    name: Literal["adamw"] = option("adamw", help="Optimizer (AdamW, decoupled weight decay).")
    lr: float = option(3e-4, help="Peak learning rate (a schedule may change it every step).")
    weight_decay: float = option(0.1, help="Weight decay of matrices (norms and biases get none).")
    beta1: float = option(0.9, help="Adam beta1.")
    beta2: float = option(0.95, help="Adam beta2.")
    eps: float = option(1e-8, help="Adam epsilon (added to the denominator).")
    clip_grad: float = option(1.0, help="Clip the global gradient norm to this value; 0 disables clipping.")
    fused: bool | None = option(
        None, help="Apply the update with torch's fused AdamW kernel; None: on when the parameters are on a GPU."
    )

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1, f"beta1 must be in [0, 1), got {self.beta1}"),
            (0 <= self.beta2 < 1, f"beta2 must be in [0, 1), got {self.beta2}"),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}"),
        ]
        for name in ("lr", "weight_decay", "beta1", "beta2", "eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"OptimizerConfig.{name} must be finite, got {getattr(self, name)}")
        for ok, message in checks:
            if not ok:
                raise ValueError(f"OptimizerConfig.{message}")


@dataclass
class StepResult:
    """What one optimizer step did (identical on every rank)."""

    applied: bool
    """False when the step was skipped because a gradient was inf/NaN."""
    grad_norm: float
    """Global gradient norm before clipping (inf/NaN when skipped)."""
    loss_scale: float
    """The loss scale the gradients carried."""


@dataclass(eq=False)
class _Segment:
    """Part of a parameter inside an owned range: range[lo:hi] == param.view(-1)[plo:plo + hi - lo]."""

    param: nn.Parameter
    lo: int
    hi: int
    plo: int
    decay: bool
    counted: bool


@dataclass(eq=False)
class _Range:
    ddp: DistributedDataParallel
    bucket_index: int
    lo: int
    hi: int
    segments: list[_Segment]
    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    @property
    def grad(self) -> torch.Tensor:
        return self.ddp.grad_buffer[self.lo : self.hi]


def _default_no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2


class AdamW:
    """AdamW with fp32 master weights over DDP-wrapped chunks; ZeRO-1 when their DDPConfig says so.

    Args:
        chunks: the DDP-wrapped model chunks of this rank (one per virtual pipeline stage).
        dims: the topology (for clipping, the overflow check and the shard all-gather).
        config: hyper-parameters.
        loss_scaler: the scale the schedule multiplied the loss by (fp16's DynamicLossScaler); default 1.
        no_decay: `(name, param) -> bool` selecting parameters without weight decay (default: 1-D ones).
    """

    def __init__(
        self,
        chunks: Sequence[DistributedDataParallel],
        dims: ParallelDims,
        config: OptimizerConfig | None = None,
        loss_scaler: DynamicLossScaler | ConstantLossScaler | None = None,
        no_decay: Callable[[str, nn.Parameter], bool] = _default_no_decay,
    ) -> None:
        if not chunks:
            raise ValueError("AdamW: no model chunks given")
        modes = {c.config.use_distributed_optimizer for c in chunks}
        if len(modes) != 1:
            raise ValueError("AdamW: chunks disagree on DDPConfig.use_distributed_optimizer")
        self.sharded = modes.pop()
        self.chunks = list(chunks)
        self.dims = dims
        self.config = config or OptimizerConfig()
        # One param group: what an lr/weight-decay scheduler writes (torch.optim's interface); the decay is
        # applied only to the parameters `no_decay` does not exclude.
        self.param_groups = [{"lr": self.config.lr, "weight_decay": self.config.weight_decay}]
        device = chunks[0].grad_buffer.device
        self.fused = self.config.fused if self.config.fused is not None else device.type == "cuda"
        self.loss_scaler = loss_scaler or ConstantLossScaler(1.0)
        self.step_count = 0
        self.ranges: list[_Range] = []
        for ddp in self.chunks:
            placed = {p: (n, where) for n, p, where in named_placements(ddp.module)}
            for bucket in ddp.buckets:
                lo, hi = ddp.local_range(bucket)
                segments = self._segments(ddp, bucket, lo, hi, placed, no_decay)
                master = torch.zeros(hi - lo, dtype=torch.float32, device=ddp.grad_buffer.device)
                for s in segments:
                    master[s.lo - lo : s.hi - lo].copy_(s.param.detach().reshape(-1)[s.plo : s.plo + s.hi - s.lo])
                self.ranges.append(
                    _Range(
                        ddp, bucket.index, lo, hi, segments, master, torch.zeros_like(master), torch.zeros_like(master)
                    )
                )

    def _segments(self, ddp, bucket, lo, hi, placed, no_decay) -> list[_Segment]:
        segments = []
        for p in bucket.params:
            start, _ = ddp.param_index[p]
            a, b = max(lo, start), min(hi, start + p.numel())
            if a < b:
                name, where = placed[p]
                segments.append(_Segment(p, a, b, a - start, not no_decay(name, p), is_counted(where, self.dims)))
        return segments

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = value

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["weight_decay"]

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: fp32 master weights and both moments of the owned ranges."""
        return sum(3 * r.master.numel() * r.master.element_size() for r in self.ranges)

    def param_segments(self):
        """This rank's optimizer state per parameter piece, for checkpointing in canonical (per-parameter) form.

        Yields:
            `(name, param, start, length, state)`: elements `start:start + length` of `param.view(-1)` (named
            `name` in its chunk) are owned here; `state` maps "master", "exp_avg", "exp_avg_sq" to views of
            the fp32 state tensors for exactly those elements (write into them to load; then call
            `sync_params_from_master()`).
        """
        for r in self.ranges:
            names = {p: n for n, p in r.ddp.module.named_parameters()}
            for seg in r.segments:
                a, b = seg.lo - r.lo, seg.hi - r.lo
                state = {"master": r.master[a:b], "exp_avg": r.exp_avg[a:b], "exp_avg_sq": r.exp_avg_sq[a:b]}
                yield names[seg.param], seg.param, seg.plo, seg.hi - seg.lo, state

    @torch.no_grad()
    def sync_params_from_master(self) -> None:
        """Writes the fp32 master weights into the parameters (and all-gathers them under ZeRO-1)."""
        self._write_back()

    def zero_grad(self) -> None:
        """Clears every chunk's gradient buffer."""
        for ddp in self.chunks:
            ddp.zero_grad_buffer()

    @torch.no_grad()
    def step(self) -> StepResult:
        """Finishes the gradient sync, then unscales, checks, clips and applies one AdamW update."""
        for ddp in self.chunks:
            ddp.finish_grad_sync()
        scale = self.loss_scaler.scale
        device = self.ranges[0].master.device
        squares = torch.zeros((), dtype=torch.float64, device=device)
        local_nonfinite = False
        for r in self.ranges:
            g = r.grad
            if scale != 1.0:
                g.mul_(1.0 / scale)
            for s in r.segments:
                if s.counted:
                    squares += g[s.lo - r.lo : s.hi - r.lo].double().pow(2).sum()
            local_nonfinite = local_nonfinite or not bool(torch.isfinite(g).all())
        found_inf = any_nonfinite(local_nonfinite, device, self.dims)
        self.loss_scaler.update(found_inf)
        if found_inf:
            return StepResult(applied=False, grad_norm=float("nan"), loss_scale=scale)
        # Non-sharded, the gradients (and so the squares) are the same on every dp rank: do not sum over dp.
        norm = float(global_norm(squares, self.dims, dp_sharded=self.sharded))
        clip = self.config.clip_grad
        coef = clip / (norm + 1e-6) if clip > 0 and norm > clip else 1.0
        self.step_count += 1
        for r in self.ranges:
            self._update(r, coef)
        self._write_back()
        return StepResult(applied=True, grad_norm=norm, loss_scale=scale)

    def _update(self, r: _Range, coef: float) -> None:
        cfg, lr, wd, t = self.config, self.lr, self.weight_decay, self.step_count
        beta1, beta2 = cfg.beta1, cfg.beta2
        grad = r.grad if coef == 1.0 else r.grad * coef
        if wd > 0:
            for s in r.segments:
                if s.decay:
                    r.master[s.lo - r.lo : s.hi - r.lo].mul_(1.0 - lr * wd)
        if self.fused:
            # The decay above is decoupled and masked per segment, so the kernel runs without its own decay.
            step = torch.full((), float(t), dtype=torch.float32, device=r.master.device)
            torch._fused_adamw_(
                [r.master], [grad], [r.exp_avg], [r.exp_avg_sq], [], [step], amsgrad=False, lr=lr, beta1=beta1,
                beta2=beta2, weight_decay=0.0, eps=cfg.eps, maximize=False, grad_scale=None, found_inf=None,
            )  # fmt: skip
            return
        r.exp_avg.lerp_(grad, 1.0 - beta1)
        r.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = lr / (1.0 - beta1**t)
        denom = (r.exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**t)).add_(cfg.eps)
        r.master.addcdiv_(r.exp_avg, denom, value=-step_size)

    def _write_back(self) -> None:
        for r in self.ranges:
            if self.sharded:
                r.ddp.param_buffer[r.lo : r.hi].copy_(r.master)
            else:
                for s in r.segments:
                    s.param.data.view(-1)[s.plo : s.plo + s.hi - s.lo].copy_(r.master[s.lo - r.lo : s.hi - r.lo])
        if self.sharded:
            for r in self.ranges:
                ddp = r.ddp
                if ddp.dp > 1:
                    bucket = ddp.buckets[r.bucket_index]
                    full = ddp.param_buffer[bucket.start : bucket.end]
                    all_gather_into(full, ddp.param_buffer[r.lo : r.hi].clone(), ddp.dp_group)

    def state_dict(self) -> dict:
        """This rank's optimizer state (owned ranges only)."""
        return {
            "step": self.step_count,
            "lr": self.lr,
            "loss_scaler": self.loss_scaler.state_dict(),
            "ranges": [{"master": r.master, "exp_avg": r.exp_avg, "exp_avg_sq": r.exp_avg_sq} for r in self.ranges],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()` taken with the same layout."""
        if len(state["ranges"]) != len(self.ranges):
            raise ValueError(f"AdamW.load_state_dict: {len(state['ranges'])} ranges, expected {len(self.ranges)}")
        self.step_count, self.lr = int(state["step"]), float(state["lr"])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        for r, saved in zip(self.ranges, state["ranges"], strict=True):
            for key in ("master", "exp_avg", "exp_avg_sq"):
                getattr(r, key).copy_(saved[key])
        self.sync_params_from_master()
