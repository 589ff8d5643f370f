"""The fp8 scaling state of the native backend: per model chunk (`ChunkScaling`) and per run (`Fp8Training`).

Delayed scaling keeps, for each fp8 linear and each of its three operands (input, weight, output gradient), an
amax history (`[amax_history_len]`, index 0 the most recent step) and the scale the next step casts with.
During a step the scale is fixed and every cast only raises the operand's pending amax (the max over
micro-batches and recomputed forwards). `Fp8Training.step()`, once per optimizer step after the backward,
reduces the pending amaxes over the tensor- and data-parallel ranks (max; so every replica and shard keeps the
same state), pushes them into the histories and computes the next scales: `max / (amax * 2**margin)` with amax
the history's max (`amax_compute_algo='max'`) or newest entry ('most_recent'); an amax that is not finite and
positive keeps the previous scale. Before the first step there is no history: casts use their current amax.

Checkpoints hold the state under canonical names, `fp8/<layer>/amax_history` ([3, L]) and `fp8/<layer>/scale`
([3]), rows in the order input, weight, grad; it is the same on every rank, so it loads at any layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megalith.core.checkpoint import LocalShard
from megalith.core.fp8.config import Fp8Config
from megalith.core.fp8.linear import ROLES
from megalith.core.fp8.quantize import FORMATS, reduce_amax, scale_from_amax

__all__ = ["FP8_PREFIX", "ChunkScaling", "Fp8Training"]

FP8_PREFIX = "fp8/"  # checkpoint key of scaling tensor KEY of linear NAME: "fp8/NAME/KEY"


class ChunkScaling:
    """The scaling state and cast statistics of every fp8 linear of one model chunk, stacked by layer.

    Attributes:
        names: canonical layer names, one per row.
        history: [layers, 3, amax_history_len] fp32 amax histories (delayed scaling).
        scale: [layers, 3] fp32 scales the current step casts with (delayed scaling).
        pending: [layers, 3] fp32 max amax seen so far this step (delayed scaling).
        initialized: whether a step has filled the histories (before that, casts use their current amax).
        collect_stats: whether casts count their saturated and underflowed elements.
    """

    def __init__(self, config: Fp8Config, names: Sequence[str], device=None) -> None:
        n, length = len(names), config.amax_history_len
        device = torch.device(device or "cpu")
        self.config, self.names = config, list(names)
        self.history = torch.zeros(n, len(ROLES), length, device=device)
        self.scale = torch.ones(n, len(ROLES), device=device)
        self.pending = torch.zeros(n, len(ROLES), device=device)
        self.stats = torch.zeros(len(ROLES), 2, dtype=torch.int64, device=device)
        self.totals = [0] * len(ROLES)
        self.initialized = False
        self.collect_stats = False

    def follow(self, device: torch.device) -> None:
        """Moves the state to `device` when the layers have moved there (a model built on one device, run on
        another)."""
        if self.history.device != device:
            for name in ("history", "scale", "pending", "stats"):
                setattr(self, name, getattr(self, name).to(device))

    def record(self, index: int, role: int, amax: torch.Tensor) -> None:
        """Raises the pending amax of operand `role` of layer `index` to `amax` (a 0-d fp32 tensor)."""
        slot = self.pending[index, role]
        slot.copy_(torch.maximum(slot, amax))

    def add_stats(self, role: int, counts: torch.Tensor, numel: int) -> None:
        self.stats[role] += counts
        self.totals[role] += numel

    def roll(self, amax: torch.Tensor) -> None:
        """Pushes this step's (reduced) amaxes `[layers, 3]` into the histories and computes the next scales."""
        config = self.config
        self.history.copy_(self.history.roll(1, dims=-1))
        self.history[..., 0] = amax
        chosen = self.history.amax(dim=-1) if config.amax_compute_algo == "max" else self.history[..., 0]
        grad_format = FORMATS["e5m2" if config.format == "hybrid" else "e4m3"]
        for role, fmt in enumerate((FORMATS["e4m3"], FORMATS["e4m3"], grad_format)):
            self.scale[:, role] = scale_from_amax(chosen[:, role], fmt, config.margin, self.scale[:, role])
        self.pending.zero_()
        self.initialized = True


class Fp8Training:
    """What a training loop does for native fp8: the per-step scale update, statistics and resume state.

    Args:
        chunks: this rank's model chunks (unwrapped), as built by `build_model_chunks` with an `Fp8Config`.
        dims: the topology (the amax reduction spans `group("tp", "dp")`); None for a single process.
        config: the fp8 section.
    """

    def __init__(self, chunks: Sequence[nn.Module], dims, config: Fp8Config) -> None:
        self.config = config
        self.states: list[ChunkScaling] = [c.fp8_scaling for c in chunks if hasattr(c, "fp8_scaling")]
        group = getattr(dims, "group", None)
        self.group = group("tp", "dp") if group is not None else None
        self._restoring = False

    @property
    def delayed(self) -> bool:
        return self.config.recipe == "delayed" and self.config.backend == "native"

    def set_collect_stats(self, on: bool) -> None:
        """Turns the saturation/underflow counting of every cast on or off (it costs a few passes per cast)."""
        for state in self.states:
            state.collect_stats = on

    @torch.no_grad()
    def step(self) -> None:
        """After a step's backward: delayed scaling folds the step's amaxes into the histories (collective
        over `group("tp", "dp")`; nothing for the other recipes)."""
        if not self.delayed or not self.states:
            return
        pending = torch.cat([s.pending.reshape(-1) for s in self.states])
        reduce_amax(pending, self.group)
        offset = 0
        for state in self.states:
            size = state.pending.numel()
            state.roll(pending[offset : offset + size].view_as(state.pending))
            offset += size

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Fractions of the cast elements that saturated and underflowed since the last call, overall and per
        operand, summed over every rank (collective when distributed); empty when nothing was counted."""
        if not self.states:
            counts = torch.zeros(len(ROLES), 3, dtype=torch.int64)
        else:
            stats = sum(s.stats for s in self.states)
            totals = torch.tensor([sum(s.totals[r] for s in self.states) for r in range(len(ROLES))])
            counts = torch.cat([stats.cpu(), totals[:, None]], dim=1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            counts = counts.to(device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        for state in self.states:
            state.stats.zero_()
            state.totals = [0] * len(ROLES)
        total = int(counts[:, 2].sum())
        if total == 0:
            return {}
        out = {"fp8_saturated": float(counts[:, 0].sum()) / total, "fp8_underflow": float(counts[:, 1].sum()) / total}
        for role, name in enumerate(ROLES):
            n = int(counts[role, 2])
            if n:
                out[f"fp8_{name}_saturated"] = float(counts[role, 0]) / n
                out[f"fp8_{name}_underflow"] = float(counts[role, 1]) / n
        return out

    def state_dict(self) -> dict[str, Any]:
        """The JSON part of the resume state (the tensors are `sharded_state()`)."""
        return {
            "recipe": self.config.recipe,
            "amax_history_len": self.config.amax_history_len,
            "initialized": all(s.initialized for s in self.states) if self.states else False,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the JSON part; the histories count as filled only when `resume_state` handed out their
        tensors for loading (else scaling starts afresh, as in a new run)."""
        initialized = self._restoring and bool(state.get("initialized", False))
        for s in self.states:
            s.initialized = initialized

    def resume_state(self, saved_tensors: Mapping[str, Any], saved: Mapping[str, Any] | None, where) -> dict:
        """The tensors of `sharded_state()` to fill from a checkpoint, or none when it has no delayed-scaling state
        for these layers (another recipe, a bf16 run, other fp8 layers).

        Args:
            saved_tensors: the checkpoint's tensor names (to their metadata).
            saved: the checkpoint's JSON fp8 state (`state_dict()` of the run that saved it), or None.
            where: the checkpoint, for the error.

        Raises:
            ValueError: the checkpoint's histories have another length than `amax_history_len`.
        """
        self._restoring = False
        state = self.sharded_state()
        saved = saved or {}
        if not state or saved.get("recipe") != "delayed" or any(name not in saved_tensors for name in state):
            return {}
        length = self.config.amax_history_len
        if saved.get("amax_history_len") != length:
            raise ValueError(
                f"{where} keeps amax histories of {saved.get('amax_history_len')} steps but fp8.amax_history_len is "
                f"{length}; resume with fp8.amax_history_len={saved.get('amax_history_len')}"
            )
        self._restoring = True
        return state

    def sharded_state(self) -> dict[str, LocalShard]:
        """`fp8/<layer>/amax_history` and `fp8/<layer>/scale` of every fp8 linear (delayed scaling only)."""
        if not self.delayed:
            return {}
        out: dict[str, LocalShard] = {}
        for state in self.states:
            for i, name in enumerate(state.names):
                out[f"{FP8_PREFIX}{name}/amax_history"] = LocalShard(state.history[i])
                out[f"{FP8_PREFIX}{name}/scale"] = LocalShard(state.scale[i])
        return out
