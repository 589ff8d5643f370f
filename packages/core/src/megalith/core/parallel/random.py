"""Tensor-parallel-aware random number streams for dropout, all derived from one base seed.

Two named streams: "replicated" gives the same numbers on every tp rank of a model replica (dropout on
activations that are identical across tp, e.g. the residual stream without sequence parallelism), and
"tp" gives different numbers on each tp rank (dropout on sharded activations: attention heads, or the
residual stream under sequence parallelism). Streams also differ across pipeline stages and data-parallel
replicas. The tracker is an object owned by the model, not global state.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

REPLICATED = "replicated"
TENSOR_PARALLEL = "tp"


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RNGTracker:
    """Holds generator states of the named streams and swaps them in around dropout.

    `with tracker.fork(name):` makes the stream the device's default generator for the block (so
    F.dropout uses it) and puts the caller's generator state back afterwards. `get_states` / `set_states`
    snapshot and restore the streams (activation recomputation replays dropout with them). `replaying` is True
    while a recomputation replays a forward with them, so layers can skip side effects that already happened
    (the MoE layers' step statistics and auxiliary-loss records).
    """

    def __init__(self, seed: int, *, tp_rank: int = 0, pp_rank: int = 0, dp_rank: int = 0, device="cpu"):
        self.device = torch.device(device)
        self.replaying = False
        self.reset(seed, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank)

    def reset(self, seed: int, *, tp_rank: int = 0, pp_rank: int = 0, dp_rank: int = 0, device=None) -> None:
        """Restarts both streams for the given base seed and rank coordinates (and device, when given)."""
        if device is not None:
            self.device = torch.device(device)
        self.seed = seed
        self._states: dict[str, torch.Tensor] = {}
        self.add(REPLICATED, derive_seed(seed, "replicated", pp_rank, dp_rank))
        self.add(TENSOR_PARALLEL, derive_seed(seed, "tp", pp_rank, dp_rank, tp_rank))

    @classmethod
    def from_dims(cls, seed: int, dims, device="cpu") -> RNGTracker:
        return cls(seed, tp_rank=dims.tp_rank, pp_rank=dims.pp_rank, dp_rank=dims.dp_rank, device=device)

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        """Registers stream `name` starting from `seed`."""
        if name in self._states:
            raise ValueError(f"RNGTracker: stream {name!r} already exists")
        if self.device.type != "cuda":
            # A fresh generator's state is what torch.manual_seed(seed) gives the default one, without
            # torch.manual_seed's seeding of every lazy device backend (~0.1 ms on a CPU-only torch; the
            # trainer reseeds each step).
            self._states[name] = torch.Generator().manual_seed(seed).get_state()
            return
        saved = self._get()
        try:
            torch.cuda.manual_seed(seed)
            self._states[name] = self._get()
        finally:
            self._set(saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL):
        """Runs the block with stream `name` as the default generator; advances the stream."""
        if name not in self._states:
            raise ValueError(f"RNGTracker: unknown stream {name!r}; known: {sorted(self._states)}")
        saved = self._get()
        self._set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get()
            self._set(saved)
