"""All-reduce through Megalith's direct NCCL communicator against torch's NCCL process group: a table, not a test.

    python benchmarks/comm.py --dry-run                      # the plan; needs no GPU
    python benchmarks/comm.py                                # one GPU (world size 1: latency only)
    torchrun --nproc-per-node 8 benchmarks/comm.py           # one node

Three ways of running the same in-place all-reduce on the current stream, measured in one run:
  torch      torch.distributed.all_reduce on the NCCL process group (the baseline);
  megalith   NcclCommunicator.all_reduce (megalith.core.distributed.nccl_comm), eager;
  graph      the same all-reduce captured in a CUDA graph and replayed (CapturedAllReduce.replay).
Small messages (1 KiB - 1 MiB) report latency in microseconds; large ones (16 MiB - 256 MiB) report bus
bandwidth, algbw * 2(n-1)/n as nccl-tests defines it (at world size 1 there is no bus traffic, so the
algorithm bandwidth is shown instead). Each time is the median over --repeats of CUDA-event-timed loops of
--iters back-to-back calls, after --warmup calls. Ratios are against torch measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

SMALL = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
LARGE = [16 << 20, 64 << 20, 256 << 20]
METHODS = ("torch", "megalith", "graph")


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=50, help="calls per timed loop")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing each case")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per case (the median is shown)")
    parser.add_argument("--timeout", type=float, default=300.0, help="the communicator's watchdog timeout (s)")
    args = parser.parse_args()
    for name in ("iters", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def _print_plan(args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"plan: in-place all-reduce of {args.dtype}, world size {world}, on the current CUDA stream")
    print(f"  methods: {', '.join(METHODS)} (ratios against torch; graph also against megalith eager)")
    print(f"  latency (us) at: {', '.join(_size(n) for n in SMALL)}")
    print(f"  bus bandwidth (GB/s) at: {', '.join(_size(n) for n in LARGE)}")
    print(f"  timing: median of {args.repeats} loops of {args.iters} calls after {args.warmup} warm-up calls")
    print("dry run: nothing was measured and no GPU was used")


def _setup(timeout: float):
    import torch
    import torch.distributed as dist

    from megalith.core.distributed.nccl_comm import NcclCommunicator

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    if "RANK" in os.environ:
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    return NcclCommunicator.from_group(timeout=timeout)


def _time(fn: Callable[[], None], args: argparse.Namespace) -> float:
    """Median seconds per call of fn over CUDA-event-timed loops."""
    import torch

    for _ in range(args.warmup):
        fn()
    samples = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / args.iters)
    return statistics.median(samples)


def _measure(comm, nbytes: int, args: argparse.Namespace) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    dtype = getattr(torch, args.dtype)
    x = torch.randn(nbytes // dtype.itemsize, device=comm.device).to(dtype)
    captured = comm.capture_all_reduce(x)
    times = {
        "torch": _time(lambda: dist.all_reduce(x), args),
        "megalith": _time(lambda: comm.all_reduce(x), args),
        "graph": _time(captured.replay, args),
    }
    comm.synchronize()
    del captured
    return times


def _bus_bandwidth(nbytes: int, seconds: float, world: int) -> float:
    factor = 2 * (world - 1) / world if world > 1 else 1.0
    return nbytes / seconds * factor / 1e9


def main() -> None:
    args = _parse()
    if args.dry_run:
        _print_plan(args)
        return
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/comm.py needs a CUDA GPU; --dry-run prints the plan without one")
    comm = _setup(args.timeout)
    world, lead = dist.get_world_size(), dist.get_rank() == 0
    rows = [(n, _measure(comm, n, args)) for n in SMALL + LARGE]
    if lead:
        version = ".".join(map(str, _nccl_version()))
        print(f"all-reduce, {args.dtype}, world size {world}, {torch.cuda.get_device_name()}, NCCL {version}")
        _print_tables(rows, world)
    comm.close()
    dist.destroy_process_group()


def _print_tables(rows: list[tuple[int, dict[str, float]]], world: int) -> None:
    header = f"{'torch us':>9} {'megalith us':>11} {'graph us':>9} | {'meg/torch':>9} {'graph/eager':>11}"
    print(f"{'size':>8} | {header}")
    for n, t in rows[: len(SMALL)]:
        us = {k: v * 1e6 for k, v in t.items()}
        print(
            f"{_size(n):>8} | {us['torch']:9.1f} {us['megalith']:11.1f} {us['graph']:9.1f} | "
            f"{t['torch'] / t['megalith']:8.2f}x {t['megalith'] / t['graph']:10.2f}x"
        )
    unit = "busbw GB/s" if world > 1 else "algbw GB/s"
    print(f"{'size':>8} | {'torch ' + unit:>17} {'megalith':>9} {'graph':>9} | {'meg/torch':>9}")
    for n, t in rows[len(SMALL) :]:
        bw = {k: _bus_bandwidth(n, v, world) for k, v in t.items()}
        print(
            f"{_size(n):>8} | {bw['torch']:17.1f} {bw['megalith']:9.1f} {bw['graph']:9.1f} | "
            f"{bw['megalith'] / bw['torch']:8.2f}x"
        )
    print("ratios > 1: faster than the baseline (meg/torch: megalith vs torch; graph/eager: replay vs megalith eager)")


def _nccl_version() -> tuple[int, int, int]:
    from megalith.kernels import nccl

    return nccl.version()


if __name__ == "__main__":
    main()
