"""Data parallelism: contiguous fp32 main-gradient buffers reduced per bucket while backward is still running.

Gradients are reduced over the ranks that hold the same weights and see different tokens
(`ParallelDims.grad_reduction`): for dense parameters the data ranks (ep * dp of them, `data_parallel_size`) times
the cp ranks under context parallelism; for routed experts the expert-data-parallel ranks (dp) times cp, since the
other ep ranks hold other experts, whose tokens reached them through the dispatch (so their gradients already sum
every data rank's contribution). Each parameter gets `p.main_grad`, a view into one flat fp32 buffer; a
post-accumulate hook moves `p.grad` into it (a copy scaled by 1/D for the step's first micro-batch, D = ep * dp,
an add after that, so the buffer is never zeroed) and frees `p.grad`, so low-precision gradients are accumulated
in fp32 across micro-batches. Parameters are grouped into buckets (in reverse registration order, roughly the order
backward produces them); a bucket holds either dense parameters or routed experts. While gradient sync is enabled
(the schedule enables it only for the last micro-batch's backward), a bucket's collective is launched
asynchronously as soon as every parameter in it has its gradient: an all-reduce over its group, or a
reduce-scatter when a distributed optimizer owns 1/(group size) of each bucket. The collective sums: the 1/D
factor the hook applied makes the sum the average over the data ranks, while the cp ranks' gradients are parts of
one micro-batch's gradient and are meant to be added. Earlier micro-batches trigger no communication at all.
Each bucket's collective goes through its `GroupComm` (`megalith.core.distributed.comm`): torch.distributed, or
Megalith's NCCL communicator with `parallel.comm=nccl`.

Under ZeRO-1 the parameters live in one flat buffer with the same bucket layout, and the optimizer all-gathers the
updated shards into it bucket by bucket. With `overlap_param_gather` those gathers are left in flight when the step
returns; forward pre-hooks on the modules holding the parameters wait for each just before its first use in the
next forward, and `finish_param_gather` waits for all of them (anything else that reads the parameters first).

A layout with nothing to reduce and nothing to upcast (one rank per reduction group, fp32 parameters, no
distributed optimizer) needs none of this: the wrapper then keeps no buffers and no hooks, autograd accumulates
`p.grad` itself, and the
optimizer reads `p.grad` (`grad_of`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from megalith.core.distributed.comm import Comms, GroupComm, all_gather_into, reduce_scatter_into
from megalith.core.fields import option
from megalith.core.parallel_dims import ParallelDims
from megalith.core.placement import named_placements

__all__ = ["Bucket", "DDPConfig", "DistributedDataParallel", "all_gather_into", "grad_of", "reduce_scatter_into"]


@dataclass(frozen=True, kw_only=True)
class DDPConfig:
    """How gradients are bucketed and reduced over the data-parallel group."""

    bucket_size: int | None = option(
        40_000_000, help="Elements per gradient bucket (a bucket closes once it reaches this size); None: one bucket."
    )
    use_distributed_optimizer: bool = option(
        False,
        help="ZeRO-1: reduce-scatter gradients and shard the fp32 master weights and Adam moments over dp; updated "
        "shards are all-gathered straight into the parameters.",
    )
    overlap_grad_reduce: bool = option(
        True, help="Reduce each bucket during backward as soon as it is complete (False: all at the end)."
    )
    overlap_param_gather: bool = option(
        False,
        help="ZeRO-1: launch the updated parameters' all-gathers asynchronously at the end of the optimizer step, "
        "one per bucket, and wait for each just before the first module of the next forward that holds one of its "
        "parameters (False: all-gather synchronously inside the step). Needs use_distributed_optimizer.",
    )

    def __post_init__(self) -> None:
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"DDPConfig.bucket_size must be a positive element count or None, got {self.bucket_size}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError(
                "DDPConfig.overlap_param_gather=true needs use_distributed_optimizer=true: only ZeRO-1 all-gathers "
                "the parameters after the step (a replicated optimizer updates them in place)"
            )


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient the optimizer and the gradient reductions act on: the fp32 `main_grad` a DDP buffer holds for
    `p`, else `p.grad` (None when `p` got no gradient)."""
    grad = getattr(p, "main_grad", None)
    return p.grad if grad is None else grad


@dataclass(eq=False)
class Bucket:
    """A contiguous range [start, end) of the flat buffers and the parameters that live in it, reduced over
    `group` (`size` ranks, this one at `rank`): all data ranks for dense parameters, the expert-data-parallel
    ranks for routed experts (`expert`)."""

    index: int
    start: int
    end: int
    params: list[nn.Parameter]
    expert: bool = False
    group: object = None
    size: int = 1
    rank: int = 0
    ready: set[int] = field(default_factory=set)
    handle: object | None = None
    scatter_out: torch.Tensor | None = None
    comm: GroupComm | None = None
    """Carries the bucket's reduction (and ZeRO-1's gather of its parameters): `Comms.grad(expert)`."""
    gather: tuple[object, torch.Tensor] | None = None
    """An in-flight parameter all-gather into this bucket (`overlap_param_gather`): its work handle and its input,
    kept alive until it completes."""

    @property
    def numel(self) -> int:
        return self.end - self.start


class DistributedDataParallel(nn.Module):
    """Wraps one model chunk; its gradients land in `p.main_grad` (fp32), averaged over dp and summed over cp.

    Args:
        module: the model chunk (all its trainable parameters must share one dtype and device).
        dims: the topology: `grad_reduction()` gives the groups dense and expert gradients are summed over, and
            `data_parallel_size` (ep * dp) the 1/D scale.
        config: bucket size and reduction mode.
        comms: the transport of the bucket collectives (`build_comms`; default: torch.distributed over the same
            groups).

    Usage per optimizer step: `zero_grad_buffer()`, then the schedule runs micro-batches with
    `set_grad_sync(i == last)` before each backward, then `finish_grad_sync()` before the optimizer step.
    """

    def __init__(
        self, module: nn.Module, dims: ParallelDims, config: DDPConfig | None = None, comms: Comms | None = None
    ) -> None:
        super().__init__()
        self.module = module
        self.config = config or DDPConfig()
        self.dp = dims.data_parallel_size  # the 1/D scale of every gradient: the sums become data averages
        # (group, size, rank) of dense and of expert buckets
        self._groups = {False: dims.grad_reduction(expert=False), True: dims.grad_reduction(expert=True)}
        self.comms = comms or Comms.default(dims)
        for expert, (_, size, _) in self._groups.items():
            if self.comms.grad(expert).size != size:
                raise ValueError(
                    f"DistributedDataParallel: comms has {self.comms.grad(expert).size} ranks for the "
                    f"{'expert' if expert else 'dense'} gradients, the topology {size}: build them from the same dims"
                )
        self.reduce_size = max(size for _, size, _ in self._groups.values())
        params = [p for p in dict.fromkeys(module.parameters()) if p.requires_grad]
        if not params:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"DistributedDataParallel: parameters must share one dtype/device, got {dtypes} {devices}")
        self.param_dtype = params[0].dtype
        self.params = params
        # Nothing to reduce and nothing to upcast: autograd's own accumulation into p.grad is all that is needed.
        self.native = (
            self.reduce_size == 1 and self.param_dtype == torch.float32 and not self.config.use_distributed_optimizer
        )
        self.grad_buffer = self.param_buffer = None
        self.buckets: list[Bucket] = []
        self.param_index: dict[nn.Parameter, tuple[int, Bucket]] = {}
        self._grad_sync = True
        self._synced = False  # finish_grad_sync ran since the last zero_grad_buffer
        self._written: set[int] = set()  # params whose main_grad holds this step's first micro-batch already
        self._hooks = []
        self.gather_order: list[Bucket] = []
        self._gathers_in_flight = 0  # parameter all-gathers launched by the optimizer and not yet waited for
        if self.native:
            return
        placed = {id(p): where for _, p, where in named_placements(module)}
        shared = {i for i, where in placed.items() if where.shared_embedding}
        experts = {i for i, where in placed.items() if where.experts is not None}
        self.buckets = self._make_buckets(list(reversed(params)), shared, experts)
        total = self.buckets[-1].end
        device = params[0].device
        self.grad_buffer = torch.zeros(total, dtype=torch.float32, device=device)
        # ZeRO-1 all-gathers updated parameter shards straight into this buffer, so parameters live in it.
        if self.config.use_distributed_optimizer:
            self.param_buffer = torch.zeros(total, dtype=self.param_dtype, device=device)
        for bucket in self.buckets:
            offset = bucket.start
            for p in bucket.params:
                n = p.numel()
                p.main_grad = self.grad_buffer[offset : offset + n].view_as(p)
                if self.param_buffer is not None:
                    view = self.param_buffer[offset : offset + n].view_as(p)
                    view.copy_(p.data)
                    p.data = view
                self.param_index[p] = (offset, bucket)
                offset += n
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]
        # The order the optimizer issues the parameter all-gathers in: the reverse of the bucket order, which is
        # roughly the order the forward reads the parameters (buckets were filled in reverse registration order).
        self.gather_order = list(reversed(self.buckets))
        if self.config.overlap_param_gather:
            self._add_gather_hooks()

    def _make_buckets(self, params: list[nn.Parameter], shared: set[int], experts: set[int]) -> list[Bucket]:
        # Shared (tied) embeddings get a bucket of their own: then their layout, and so their reduce-scatter
        # shards, are the same on the first and the last pipeline stage, whose gradients are summed elementwise.
        # A bucket never mixes dense parameters and routed experts (they are reduced over different groups).
        limit = self.config.bucket_size
        buckets: list[Bucket] = []
        current: list[nn.Parameter] = []
        start, kind = 0, False

        def close() -> None:
            nonlocal start, current
            if current:
                group, size, rank = self._groups[kind]
                align = size if self.config.use_distributed_optimizer else 1
                numel = sum(p.numel() for p in current)
                padded = -(-numel // align) * align
                comm = self.comms.grad(kind)
                buckets.append(Bucket(len(buckets), start, start + padded, current, kind, group, size, rank, comm=comm))
                start += padded
                current = []

        for p in params:
            if id(p) in shared:
                close()
                current, kind = [p], False
                close()
                continue
            if (id(p) in experts) != kind:
                close()
                kind = id(p) in experts
            current.append(p)
            if limit is not None and sum(q.numel() for q in current) >= limit:
                close()
        close()
        return buckets

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # -- overlapped parameter all-gather (ZeRO-1, `overlap_param_gather`) -------------------------------------

    def _add_gather_hooks(self) -> None:
        # Every module that holds parameters directly waits, before its forward, for the pending gathers of
        # `gather_order` up to the last one holding a parameter of its own. Waiting that whole prefix (not only
        # its own buckets) also covers a parameter read outside its owner's forward, provided it was gathered
        # before something the forward runs earlier: the tied embedding, which the last stage's output
        # projection reads through `Embedding.attend`, is registered first, has a bucket of its own, and so is
        # gathered first.
        position = {bucket.index: i for i, bucket in enumerate(self.gather_order)}
        compiled = [name for name, m in self.module.named_modules() if getattr(m, "_compiled_call_impl", None)]
        for name, module in self.module.named_modules():
            own = [p for p in module.parameters(recurse=False) if p in self.param_index]
            if not own:
                continue
            inside = [c for c in compiled if name == c or name.startswith(f"{c}.") or not c]
            if inside:
                raise ValueError(
                    f"DDPConfig.overlap_param_gather=true cannot wait for a parameter gather inside the compiled "
                    f"module {inside[0] or 'the model'!r} (runtime.compile=true): a work handle's wait is not "
                    "traceable; turn one of them off"
                )
            last = max(position[self.param_index[p][1].index] for p in own)
            self._hooks.append(module.register_forward_pre_hook(functools.partial(self._wait_gathers_through, last)))

    def track_param_gather(self, bucket: Bucket, handle, source: torch.Tensor) -> None:
        """Records an asynchronous all-gather into `bucket`'s parameters (the optimizer launched it); the forward
        pre-hooks, or `finish_param_gather`, wait for it. `source` (its input) is kept alive until then."""
        if bucket.gather is not None:
            raise RuntimeError(f"bucket {bucket.index} already has a parameter all-gather in flight")
        bucket.gather = (handle, source)
        self._gathers_in_flight += 1

    def _wait_gathers_through(self, last: int, *_) -> None:
        if self._gathers_in_flight:
            for bucket in self.gather_order[: last + 1]:
                self._wait_gather(bucket)

    def _wait_gather(self, bucket: Bucket) -> None:
        if bucket.gather is not None:
            bucket.gather[0].wait()
            bucket.gather = None
            self._gathers_in_flight -= 1

    def finish_param_gather(self) -> None:
        """Waits for every parameter all-gather still in flight: afterwards every parameter holds the values of
        the last optimizer step. Call it before reading parameters outside this chunk's forward (checkpoint, export,
        generation, a comparison); it does nothing when none is in flight."""
        for bucket in self.gather_order:
            self._wait_gather(bucket)

    # -- gradient sync control -------------------------------------------------------------------------------

    def set_grad_sync(self, enabled: bool) -> None:
        """Whether the coming backward is the last one before the optimizer step (launches the collectives)."""
        self._grad_sync = enabled

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside the block."""
        previous = self._grad_sync
        self._grad_sync = False
        try:
            yield
        finally:
            self._grad_sync = previous

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if self._synced:
            raise RuntimeError("a backward ran after finish_grad_sync; call zero_grad_buffer() first")
        if id(p) in self._written:
            p.main_grad.add_(p.grad, alpha=1.0 / self.dp)
        else:  # the step's first gradient of p: a (scaled) copy, so the buffer needs no zeroing between steps
            torch.mul(p.grad, 1.0 / self.dp, out=p.main_grad)
            self._written.add(id(p))
        p.grad = None
        if not (self._grad_sync and self.config.overlap_grad_reduce):
            return
        _, bucket = self.param_index[p]
        bucket.ready.add(id(p))
        if len(bucket.ready) == len(bucket.params) and bucket.handle is None:
            self._launch(bucket, async_op=True)

    def _launch(self, bucket: Bucket, async_op: bool) -> None:
        data = self.grad_buffer[bucket.start : bucket.end]
        for p in bucket.params:  # a parameter no backward reached this step holds last step's values
            if id(p) not in self._written:
                p.main_grad.zero_()
                self._written.add(id(p))
        if bucket.size == 1:
            bucket.handle = _Done()
            return
        if self.config.use_distributed_optimizer:
            # A separate output tensor: not every backend accepts an output that aliases the input.
            bucket.scatter_out = torch.empty(bucket.numel // bucket.size, dtype=data.dtype, device=data.device)
            bucket.handle = bucket.comm.reduce_scatter(bucket.scatter_out, data, async_op=async_op)
        else:
            bucket.handle = bucket.comm.all_reduce(data, async_op=async_op)
        if bucket.handle is None:
            bucket.handle = _Done()

    def finish_grad_sync(self) -> None:
        """Waits for every bucket's collective, launching those backward did not (unused params, no overlap).

        Afterwards `main_grad` holds the reduced gradient (all of it, or this rank's shard of each bucket under
        the distributed optimizer: see `local_range`). Calling it again before
        `zero_grad_buffer` does nothing (the schedule finishes the sync; the optimizer step makes sure).
        """
        if self._synced:
            return
        self._synced = True
        if self.native:
            return
        for bucket in self.buckets:
            if bucket.handle is None:
                self._launch(bucket, async_op=True)
        for bucket in self.buckets:
            bucket.handle.wait()
            if bucket.scatter_out is not None:
                lo, hi = self.local_range(bucket)
                self.grad_buffer[lo:hi].copy_(bucket.scatter_out)
                bucket.scatter_out = None
            bucket.handle = None
            bucket.ready.clear()

    def local_range(self, bucket: Bucket) -> tuple[int, int]:
        """The [lo, hi) buffer range whose reduced gradient this rank holds (and whose optimizer state it owns)."""
        if not self.config.use_distributed_optimizer:
            return bucket.start, bucket.end
        shard = bucket.numel // bucket.size
        lo = bucket.start + bucket.rank * shard
        return lo, lo + shard

    def zero_grad_buffer(self) -> None:
        """Starts a new step: the next micro-batches' gradients replace the accumulated ones (no pass over the
        buffer: the first gradient of each parameter is copied in, see `_on_grad_ready`)."""
        self._synced = False
        self._written.clear()
        for bucket in self.buckets:
            if bucket.handle is not None:
                raise RuntimeError("zero_grad_buffer called while a gradient reduction is in flight")
            bucket.ready.clear()
        for p in self.params:
            p.grad = None


class _Done:
    """A finished work handle (nothing to reduce, or a backend that returned None for a synchronous call)."""

    def wait(self) -> bool:
        return True
