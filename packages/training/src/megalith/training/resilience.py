"""Stopping cleanly: stop signals and wall-clock limits agreed across ranks, NaN/Inf losses."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "ExitMonitor",
    "NonFiniteLossError",
    "NonFiniteTracker",
]


def _reduce_max(values: Sequence[float], group: Any) -> list[float]:
    """Element-wise maximum over the ranks of `group` (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


class ExitMonitor:
    """Catches stop signals and watches a wall-clock limit; `check()` gives every rank the same answer.

    The signal handlers only set a flag, so the current step finishes; the loop then calls `check()` (a tiny
    all-reduce) at a step boundary and, when it returns a reason, saves a checkpoint and exits 0. A second
    SIGINT while waiting raises KeyboardInterrupt as usual.

    Args:
        duration_s: stop after this many seconds since `start_time` (None: no limit).
        signals: the signals that request a stop.
        start_time: `time.time()` at the start of the job (default: now).
        group: process group the decision is agreed over (default: the world).
    """

    def __init__(
        self,
        *,
        duration_s: float | None = None,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1),
        start_time: float | None = None,
        group: Any = None,
    ) -> None:
        self.duration_s = duration_s
        self.signals = tuple(signals)
        self.start_time = time.time() if start_time is None else start_time
        self.group = group
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> ExitMonitor:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("ExitMonitor.install() must run in the main thread (signal handlers live there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> ExitMonitor:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def check(self) -> str | None:
        """None to go on, else why to stop ("signal SIGTERM", "duration"), identical on every rank. Collective."""
        elapsed_over = self.duration_s is not None and time.time() - self.start_time >= self.duration_s
        sig, over = _reduce_max([float(self.received or 0), float(elapsed_over)], self.group)
        if sig:
            return f"signal {signal.Signals(int(sig)).name}"
        if over:
            return "duration"
        return None


class NonFiniteLossError(RuntimeError):
    """Too many NaN/Inf losses in a row (or one, under the abort policy)."""


class NonFiniteTracker:
    """Decides whether a step's update is applied, given its loss; counts skipped steps.

    Args:
        policy: "skip" drops the update of a step whose loss is NaN/Inf; "abort" raises at the first one.
        max_consecutive: raise after this many non-finite losses in a row.
        group: process group the verdict is agreed over (ranks without the loss pass None to `check`).
    """

    def __init__(self, policy: str = "skip", max_consecutive: int = 5, group: Any = None) -> None:
        if policy not in ("skip", "abort"):
            raise ValueError(f"non-finite policy must be 'skip' or 'abort', got {policy!r}")
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.group = group
        self.consecutive = 0
        self.skipped_total = 0

    def check(self, step: int, loss: float | torch.Tensor | None) -> bool:
        """True when the step's update should be applied; False to skip it. Collective over `group`."""
        bad_here = loss is not None and not math.isfinite(float(loss))
        (bad,) = _reduce_max([float(bad_here)], self.group)
        if not bad:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped_total += 1
        if self.policy == "abort":
            raise NonFiniteLossError(f"non-finite loss at step {step} (training.nonfinite_policy is 'abort')")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row (steps {step - self.consecutive + 1}..{step}); "
                "stopping. Lower the learning rate, check the data, or resume from an earlier checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
