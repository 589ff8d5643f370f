"""Memory visibility: every rank's peak memory in the logs, and out-of-memory as a one-line error with the knobs.

On CUDA each rank reports the caching allocator's peak allocated and peak reserved bytes since the process started
(reserved is what the allocator holds from the driver, so it is what runs out); on CPU the peak resident set of
the process. `peak_memory_per_rank` gathers them over the world at a log interval (every rank calls it), and
`memory_metrics` turns them into the logged fields. `out_of_memory_message` is what `megalith-train` prints when a
step or the setup runs out of device memory.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

__all__ = [
    "TrainingOutOfMemoryError",
    "format_memory_per_rank",
    "local_peak_memory",
    "memory_metrics",
    "out_of_memory_message",
    "peak_memory_per_rank",
]

GIB = 2**30


class TrainingOutOfMemoryError(RuntimeError):
    """The device ran out of memory during the setup or a step; the message names the layout and what to change."""


def local_peak_memory(device: torch.device | None = None) -> tuple[float, float]:
    """(peak allocated GiB, peak reserved GiB) of this process on `device`.

    On CUDA: the caching allocator's peaks since the process started. Elsewhere: the peak resident set size
    twice (a CPU process has no separate reservation).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    return rss, rss


def peak_memory_per_rank(device: torch.device | None = None, group=None) -> tuple[list[float], list[float]]:
    """Each rank's (peak allocated, peak reserved) GiB, in rank order of `group` (default: the world).

    A collective when torch.distributed is initialised: every rank of `group` must call it. The values travel
    in a float64 tensor on `device` (the device NCCL needs; gloo uses the CPU).
    """
    allocated, reserved = local_peak_memory(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [allocated], [reserved]
    device = torch.device("cpu") if device is None else torch.device(device)
    mine = torch.tensor([allocated, reserved], dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    values = [t.tolist() for t in everyone]
    return [a for a, _ in values], [r for _, r in values]


def memory_metrics(allocated: list[float], reserved: list[float], *, cuda: bool) -> dict[str, float | list[float]]:
    """The logged memory fields from per-rank peaks (GiB).

    `mem_gib` is the largest peak over ranks (allocated on CUDA, resident set on CPU), `mem_reserved_gib` the
    largest reserved peak (CUDA only); the `*_per_rank` lists hold every rank's value (metrics.jsonl only:
    TensorBoard and W&B take the scalars).
    """
    out: dict[str, float | list[float]] = {"mem_gib": max(allocated)}
    if cuda:
        out["mem_reserved_gib"] = max(reserved)
    if len(allocated) > 1:
        out["mem_gib_per_rank"] = list(allocated)
        if cuda:
            out["mem_reserved_gib_per_rank"] = list(reserved)
    return out


def format_memory_per_rank(allocated: list[float], reserved: list[float], *, cuda: bool) -> str:
    """One console line with every rank's peak: `peak memory per rank, GiB allocated/reserved: r0 1.20/1.50 ...`."""
    if cuda:
        cells = [f"r{r} {a:.2f}/{v:.2f}" for r, (a, v) in enumerate(zip(allocated, reserved, strict=True))]
        return "peak memory per rank, GiB allocated/reserved: " + " | ".join(cells)
    cells = [f"r{r} {a:.2f}" for r, a in enumerate(allocated)]
    return "peak memory per rank, GiB resident: " + " | ".join(cells)


def _requested(error: BaseException) -> str | None:
    """'2.00 GiB' out of torch's 'CUDA out of memory. Tried to allocate 2.00 GiB. ...', when it says so."""
    match = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B)", str(error))
    return match.group(1) if match else None


def out_of_memory_message(
    error: BaseException,
    *,
    where: str,
    rank: int,
    device: torch.device,
    layout: dict,
) -> str:
    """The one-line error for an out-of-memory `error` raised `where` (e.g. "in step 3") on `rank`.

    Args:
        error: torch's OutOfMemoryError.
        where: when it happened, for the message.
        rank: the global rank that ran out.
        device: its device.
        layout: tp, pp, virtual_stages, dp, micro_batch_size, seq_len, precision, recompute,
            distributed_optimizer (bool) and compile (bool) of the run.
    """
    lay = layout
    pipeline = f"pp {lay['pp']}" + (f" (x{lay['virtual_stages']} virtual)" if lay["virtual_stages"] > 1 else "")
    parts = [
        f"out of memory {where} on rank {rank} ({device})",
        f"layout tp {lay['tp']} x {pipeline} x dp {lay['dp']}, micro-batch {lay['micro_batch_size']} x seq "
        f"{lay['seq_len']}, {lay['precision']}, recompute {lay['recompute']}, "
        f"ZeRO-1 {'on' if lay['distributed_optimizer'] else 'off'}" + (", compiled blocks" if lay["compile"] else ""),
    ]
    requested = _requested(error)
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        peak = torch.cuda.max_memory_allocated(device) / GIB
        held = torch.cuda.memory_reserved(device) / GIB
        asked = f"asked for {requested} more; " if requested else ""
        parts.append(f"{asked}peak {peak:.2f} GiB allocated, {held:.2f} GiB reserved of {total:.2f} GiB")
    elif requested:
        parts.append(f"asked for {requested} more")
    parts.append("to fit, try " + ", ".join(_knobs(lay)))
    return "; ".join(parts)


def _knobs(lay: dict) -> list[str]:
    """The settings that lower memory per device, most effective first, leaving out those already at their limit."""
    knobs = []
    if lay["micro_batch_size"] > 1:
        smaller = max(1, lay["micro_batch_size"] // 2)
        knobs.append(f"a smaller training.micro_batch_size (e.g. {smaller}; raise the micro-batches per step instead)")
    if lay["recompute"] == "none":
        knobs.append("runtime.recompute=selective (or full)")
    elif lay["recompute"] == "selective":
        knobs.append("runtime.recompute=full")
    knobs.append(f"a larger parallel.tp (now {lay['tp']}) or parallel.pp (now {lay['pp']})")
    if not lay["distributed_optimizer"] and lay["dp"] > 1:
        knobs.append("ddp.use_distributed_optimizer=true (ZeRO-1: optimizer state sharded over dp)")
    elif not lay["distributed_optimizer"]:
        knobs.append("ddp.use_distributed_optimizer=true with more data-parallel ranks (ZeRO-1)")
    if lay["precision"] == "fp32":
        knobs.append("precision.dtype=bf16")
    return knobs
