"""AdamW over this rank's model chunks: torch's fused (or multi-tensor) kernel on fp32 masters, ZeRO-1 optional.

The update is `torch.optim.AdamW` (its fused kernel where the device has one, CPU included; else its multi-tensor
kernel) applied to this rank's *masters*, each with the gradient the DDP wrapper produced:

- fp32 parameters, replicated optimizer: the masters are the parameters themselves (no copy, no write-back);
- bf16/fp16 parameters: fp32 copies of the parameters, written back into them after each update;
- with `use_distributed_optimizer` (ZeRO-1): this rank's shard of every bucket (1/(cp * ep * dp) of a dense
  bucket, 1/(cp * dp) of a routed-expert bucket: each over the ranks that hold the same values,
  `ParallelDims.grad_reduction`), as one view per parameter piece, of the parameter buffer itself (fp32) or of an
  fp32 copy of it; updated shards are all-gathered through each bucket's `GroupComm`, as its gradients were
  reduced (left in flight when the step returns, with `DDPConfig.overlap_param_gather`: the next forward waits
  for each bucket before its first use, and `finish_param_gather` for all of them).

A step unscales the gradients (fp16), takes the global gradient norm (which also tells whether any gradient is
inf/NaN: the step is then skipped), clips, and updates. Nothing else touches every parameter per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.profiler import record_function

from megalith.core.distributed.ddp import DistributedDataParallel
from megalith.core.fields import option
from megalith.core.grad_clip import global_norm, is_counted
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
        None,
        help="Update with torch's fused AdamW kernel (true) or its multi-tensor kernel (false); None: fused where "
        "torch has a fused kernel for the device (CPU and CUDA), else multi-tensor.",
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
class _Piece:
    """One parameter's part owned here: master[...] is param.view(-1)[start:start + length] (in fp32).

    `master.grad` is its gradient: autograd's own (`p.grad`) when the master is a DDP-less parameter; a view of the
    DDP buffer otherwise (set once for separate masters; pointed at `p.main_grad` before each update when the
    master is the parameter itself, `via_main_grad`).
    """

    name: str
    param: nn.Parameter
    start: int
    length: int
    master: torch.Tensor
    counted: bool
    via_main_grad: bool = False
    expert: bool = False


@dataclass(eq=False)
class _Shard:
    """A ZeRO-1 shard: buffer range [lo, hi) of one bucket of `ddp`, with its fp32 master (maybe the buffer)."""

    ddp: DistributedDataParallel
    bucket_index: int
    lo: int
    hi: int
    master: torch.Tensor


def _default_no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2


def _fused_available(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


class AdamW:
    """AdamW over DDP-wrapped chunks: fp32 masters (the parameters themselves when they are fp32), ZeRO-1 when
    their DDPConfig says so.

    Args:
        chunks: the DDP-wrapped model chunks of this rank (one per virtual pipeline stage).
        dims: the topology (for the global norm, the overflow check and the shard all-gather).
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
        overlaps = {c.config.overlap_param_gather for c in chunks}
        if len(overlaps) != 1:
            raise ValueError("AdamW: chunks disagree on DDPConfig.overlap_param_gather")
        self.overlap_param_gather = overlaps.pop()
        self.chunks = list(chunks)
        self.dims = dims
        self.config = config or OptimizerConfig()
        self.loss_scaler = loss_scaler or ConstantLossScaler(1.0)
        self.device = chunks[0].params[0].device
        self.fused = self.config.fused if self.config.fused is not None else _fused_available(self.device)
        self.shards: list[_Shard] = []
        self.pieces: list[_Piece] = []
        for ddp in self.chunks:
            self._add_chunk(ddp)
        # All-gathers are issued chunk by chunk, each chunk's in the order its forward reads them.
        shard_of = {(id(s.ddp), s.bucket_index): s for s in self.shards}
        self._gather_order = [shard_of[id(d), b.index] for d in self.chunks if self.sharded for b in d.gather_order]
        decay = [p.master for p in self.pieces if not no_decay(p.name, p.param)]
        plain = [p.master for p in self.pieces if no_decay(p.name, p.param)]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        self._torch = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.config.lr, betas=(self.config.beta1, self.config.beta2),
            eps=self.config.eps, fused=self.fused or None, foreach=None if self.fused else True,
        )  # fmt: skip
        # What an lr/weight-decay scheduler writes (each group's lr and weight decay, torch.optim's interface).
        self.param_groups = self._torch.param_groups
        self._step_count = 0
        for piece in self.pieces:  # created now, so a checkpoint can be loaded into them before the first step
            self._torch.state[piece.master] = {
                "step": torch.zeros((), dtype=torch.float32, device=self.device if self.fused else "cpu"),
                "exp_avg": torch.zeros_like(piece.master),
                "exp_avg_sq": torch.zeros_like(piece.master),
            }

    def _add_chunk(self, ddp: DistributedDataParallel) -> None:
        placed = {p: (n, where) for n, p, where in named_placements(ddp.module)}
        if not self.sharded:
            for p in ddp.params:
                name, where = placed[p]
                counted, expert = is_counted(where, self.dims), where.experts is not None
                if p.dtype == torch.float32:  # the parameter is its own master
                    self.pieces.append(
                        _Piece(name, p, 0, p.numel(), p, counted, via_main_grad=not ddp.native, expert=expert)
                    )
                    continue
                master = p.detach().float().clone()
                master.grad = p.main_grad
                self.pieces.append(_Piece(name, p, 0, p.numel(), master, counted, expert=expert))
            return
        for bucket in ddp.buckets:
            lo, hi = ddp.local_range(bucket)
            master = ddp.param_buffer[lo:hi]  # fp32 parameters live in the buffer: it is the master
            if ddp.param_dtype != torch.float32:
                master = master.float()
            self.shards.append(_Shard(ddp, bucket.index, lo, hi, master))
            for p in bucket.params:
                start, _ = ddp.param_index[p]
                a, b = max(lo, start), min(hi, start + p.numel())
                if a < b:
                    name, where = placed[p]
                    view = master[a - lo : b - lo]
                    view.grad = ddp.grad_buffer[a:b]
                    self.pieces.append(
                        _Piece(name, p, a - start, b - a, view, is_counted(where, self.dims), expert=bucket.expert)
                    )

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value

    @property
    def step_count(self) -> int:
        """Updates applied so far (Adam's bias correction uses it)."""
        return self._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step_count = int(value)
        for piece in self.pieces:
            self._torch.state[piece.master]["step"].fill_(float(value))

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: both moments, and the fp32 masters that are not parameters."""
        total = 0
        for piece in self.pieces:
            state = self._torch.state[piece.master]
            total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
            if not self.sharded and piece.master is not piece.param:
                total += piece.master.numel() * piece.master.element_size()
        for shard in self.shards:
            if shard.ddp.param_dtype != torch.float32:
                total += shard.master.numel() * shard.master.element_size()
        return total

    def param_segments(self):
        """This rank's optimizer state per parameter piece, for checkpointing in canonical (per-parameter) form.

        Yields:
            `(name, param, start, length, state)`: elements `start:start + length` of `param.view(-1)` are owned
            here; `state` maps "master", "exp_avg", "exp_avg_sq" to flat fp32 views of exactly those elements
            (write into them to load; then call `sync_params_from_master()`).
        """
        for piece in self.pieces:
            state = self._torch.state[piece.master]
            views = {"master": piece.master.detach().reshape(-1)}
            views.update({k: state[k].reshape(-1) for k in ("exp_avg", "exp_avg_sq")})
            yield piece.name, piece.param, piece.start, piece.length, views

    @torch.no_grad()
    def sync_params_from_master(self) -> None:
        """Writes the fp32 master weights into the parameters (and all-gathers them under ZeRO-1, synchronously)."""
        self.finish_param_gather()
        self._write_back(overlap=False)

    def finish_param_gather(self) -> None:
        """Waits for the parameter all-gathers the last step left in flight (`DDPConfig.overlap_param_gather`).

        The next forward waits for each bucket by itself; call this before anything else reads the parameters
        (saving a checkpoint, evaluation outside the schedule, export, generation, comparing weights). It does
        nothing when no gather is in flight.
        """
        for ddp in self.chunks:
            ddp.finish_param_gather()

    def zero_grad(self) -> None:
        """Starts a new step: every chunk's gradients are replaced by the next backward's."""
        for ddp in self.chunks:
            ddp.zero_grad_buffer()

    @torch.no_grad()
    def step(self) -> StepResult:
        """Finishes the gradient sync, then unscales, checks, clips and applies one AdamW update.

        With `DDPConfig.overlap_param_gather` the updated parameters' all-gathers are still in flight when this
        returns (see `finish_param_gather`).
        """
        self.finish_param_gather()  # a gather no forward waited for (an unused parameter) writes into the masters
        with record_function("megalith.grad_sync"):
            for ddp in self.chunks:
                ddp.finish_grad_sync()
        with record_function("megalith.grad_norm_clip"):
            scale = self.loss_scaler.scale
            for piece in self.pieces:
                if piece.via_main_grad:
                    piece.param.grad = piece.param.main_grad
            grads = [piece.master.grad for piece in self.pieces]
            if scale != 1.0:
                for g in self._unique_grads(grads):
                    g.mul_(1.0 / scale)
            squares = []
            for expert in (False, True):  # dense parameters, then routed experts (summed over ep too)
                counted = [g for piece, g in zip(self.pieces, grads, strict=True)
                           if piece.counted and piece.expert == expert and g is not None]  # fmt: skip
                local = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=self.device)
                squares.append(local.double() ** 2)
            # Non-sharded, the gradients (and so the squares) are the same on every dp and cp rank: no sum over them.
            norm = float(global_norm(squares[0], self.dims, dp_sharded=self.sharded, expert_squares=squares[1]))
            found_inf = not math.isfinite(norm)  # an inf/NaN anywhere makes the global norm inf/NaN everywhere
            self.loss_scaler.update(found_inf)
            if found_inf:
                return StepResult(applied=False, grad_norm=float("nan"), loss_scale=scale)
            clip = self.config.clip_grad
            with_grad = [piece.master for piece in self.pieces if piece.master.grad is not None]
            if clip > 0 and norm > clip and with_grad:
                torch.nn.utils.clip_grads_with_norm_(with_grad, clip, torch.tensor(norm))
        with record_function("megalith.optimizer"):
            self._torch.step()
            self._step_count += 1
            self._write_back(overlap=self.overlap_param_gather)
        return StepResult(applied=True, grad_norm=norm, loss_scale=scale)

    @staticmethod
    def _unique_grads(grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        seen, out = set(), []
        for g in grads:
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                out.append(g)
        return out

    def _write_back(self, overlap: bool) -> None:
        if not self.sharded:
            for piece in self.pieces:
                if piece.master is not piece.param:
                    piece.param.data.copy_(piece.master.view_as(piece.param))
            return
        for shard in self.shards:
            if shard.ddp.param_dtype != torch.float32:
                shard.ddp.param_buffer[shard.lo : shard.hi].copy_(shard.master)
        for shard in self._gather_order:
            ddp = shard.ddp
            bucket = ddp.buckets[shard.bucket_index]
            if bucket.size > 1:
                full = ddp.param_buffer[bucket.start : bucket.end]
                source = ddp.param_buffer[shard.lo : shard.hi].clone()
                handle = bucket.comm.all_gather(full, source, async_op=overlap)
                if overlap:  # waited by the forward pre-hooks of the modules holding its parameters
                    ddp.track_param_gather(bucket, handle, source)
