"""Joining the process group: the one way Megalith starts torch.distributed (torchrun's environment, or alone)."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistributedEnv", "destroy_distributed", "init_distributed"]


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """This process's place in the world and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> DistributedEnv:
    """Initialises the default process group from torchrun's environment (or a 1-rank world without one).

    The backend is NCCL when CUDA is available, else gloo (override with `backend`); under NCCL the process
    uses GPU `LOCAL_RANK % device_count`. A collective that waits longer than `timeout_s` (e.g. because another
    rank died) fails with an error instead of hanging. When the default group already exists (a launcher or a
    test harness made it), it is used as it is.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = dist.get_backend() if dist.is_initialized() else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA, and torch sees no GPU")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # plain `python script.py`: a world of one, so the same code paths run
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
