"""The parallel topology: degrees of tp, cp, ep, dp, pp, each rank's coordinates, and the process groups.

Rank order (fastest-varying first): tp, cp, ep, dp, pp. A rank's coordinates are

    rank = tp_rank + tp * (cp_rank + cp * (ep_rank + ep * (dp_rank + dp * pp_rank)))

so the ranks of one tensor-parallel group are consecutive (on one node when tp <= GPUs per node), the ranks of one
context-parallel ring are close to each other, and pipeline stages are the slowest-varying dimension (they talk
least).

Context and expert parallelism are data-like dimensions for the dense weights: ranks that differ only in cp_rank,
ep_rank or dp_rank hold the same dense parameters and see different tokens (cp ranks other parts of the same
sequences, ep and dp ranks other samples). Expert parallelism is carved out of data parallelism (as Megatron does):
the data-parallel size a user writes (`ParallelConfig.dp`) is `ep * dp` here (`data_parallel_size`, with this
rank's data shard `data_rank` in `data_group`). Gradients are summed over `grad_reduction()`: `group("cp", "ep",
"dp")` for dense parameters, `group("cp", "dp")` for routed experts (the other ep ranks hold other experts, whose
tokens reached them through the dispatch); ZeRO-1 shards over the same groups. Every gradient is scaled by
1/(ep * dp) first, so the sums average over the data shards and add up the cp ranks' parts of one sequence.

Groups are created once, when the object is built, and passed explicitly to whatever needs them; nothing
here is stored at module level. `ParallelConfig` is the layout as a user writes it (megalith-train's `parallel`
section); `ParallelDims.from_config` turns it into the topology of the running world.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch.distributed as dist

from megalith.core.fields import option
from megalith.core.world import init_distributed

DIM_NAMES: tuple[str, ...] = ("tp", "cp", "ep", "dp", "pp")
"""Dimension names, fastest-varying first (the rank order)."""
CP_COMMS = ("ring", "allgather")
"""How context-parallel attention exchanges keys and values (`ParallelConfig.cp_comm`)."""
DISPATCHERS = ("alltoall", "allgather")
"""How tokens reach their experts over ep (`ParallelConfig.moe_dispatcher`)."""
COMMS = ("torch", "nccl")
"""Transports of the data-parallel and pipeline traffic (`ParallelConfig.comm`, `megalith.core.distributed.comm`)."""


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The parallel layout: degrees (dp is what the world size leaves), pipeline chunks, sequence parallelism."""

    tp: int = option(1, help="Tensor-parallel degree.")
    cp: int = option(1, help="Context-parallel degree: the sequence of each sample is split over this many ranks.")
    cp_comm: str = option(
        "ring",
        help="Context-parallel attention: ring (key/value blocks passed around the cp ring, overlapped with "
        "compute) or allgather (keys/values all-gathered, Llama-3 style).",
    )
    pp: int = option(1, help="Pipeline-parallel degree.")
    dp: int | None = option(
        None, help="Data-parallel degree, ep included; None: world_size / (tp * cp * pp). Checked when set."
    )
    ep: int = option(
        1, help="Expert-parallel degree: the routed experts are split over ep ranks carved out of the dp ranks."
    )
    expert_tp: int | None = option(
        None, help="Tensor parallelism inside each expert: tp (split every expert) or 1 (whole experts); None: tp."
    )
    moe_dispatcher: str = option(
        "alltoall",
        help="How tokens reach their experts over ep: 'alltoall' (uneven all-to-all) or 'allgather' (every rank "
        "gathers all tokens; simpler, for small ep).",
    )
    virtual_stages: int = option(1, help="Model chunks per pipeline rank (> 1: interleaved 1F1B).")
    layers_per_stage: list[int] | None = option(None, help="Layers of each virtual stage (default: even split).")
    sequence_parallel: bool = option(False, help="Shard activations along the sequence between layers (tp > 1).")
    overlap_p2p_comm: bool = option(
        False,
        help="Pipeline: post each pass's send as soon as it ends, with the receives of the next forward and backward, "
        "and wait for a receive only right before its pass, so transfers run during compute (gloo only; no effect "
        "when pp = 1).",
    )
    backend: str = option("auto", help="Process-group backend: auto (NCCL on GPUs, else gloo), nccl or gloo.")
    device: str = option("auto", help="Where to train: auto (a GPU when present), cuda or cpu.")
    comm: str = option(
        "torch",
        help="Transport of the data-parallel gradient reductions, ZeRO-1's parameter all-gather and the pipeline's "
        "transfers: torch (torch.distributed) or nccl (Megalith's own NCCL communicator; CUDA builds, GPUs). "
        "Tensor-, context- and expert-parallel traffic stays on torch.distributed.",
    )
    comm_timeout: float = option(
        600.0,
        help="Seconds a collective or transfer may wait (e.g. for a rank that died or hangs) before it raises on "
        "the ranks still alive instead of hanging: the timeout of torch's process groups, and with comm=nccl the "
        "watchdog that aborts Megalith's NCCL communicators.",
    )

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp", "ep", "virtual_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        checks = [
            (self.dp is None or self.dp >= 1, f"dp must be >= 1, got {self.dp}"),
            (
                self.virtual_stages == 1 or self.pp > 1,
                f"virtual_stages ({self.virtual_stages}) > 1 needs pp > 1 (pp={self.pp})",
            ),
            (not self.sequence_parallel or self.tp > 1, "sequence_parallel needs tp > 1"),
            (self.cp_comm in CP_COMMS, f"cp_comm must be one of {', '.join(CP_COMMS)}, got {self.cp_comm!r}"),
            (self.backend in ("auto", "nccl", "gloo"), f"backend must be auto, nccl or gloo, got {self.backend!r}"),
            (
                not (self.overlap_p2p_comm and "nccl" in (self.backend, self.comm)),
                "overlap_p2p_comm is implemented for the gloo backend and comm=torch only (NCCL matches "
                "point-to-point operations in posting order, which posting receives ahead changes); set "
                "overlap_p2p_comm=false",
            ),
            (self.device in ("auto", "cuda", "cpu"), f"device must be auto, cuda or cpu, got {self.device!r}"),
            (self.comm in COMMS, f"comm must be one of {', '.join(COMMS)}, got {self.comm!r}"),
            (
                not isinstance(self.comm_timeout, bool)
                and isinstance(self.comm_timeout, (int, float))
                and 0 < self.comm_timeout < float("inf"),
                f"comm_timeout must be a finite number of seconds > 0, got {self.comm_timeout!r}",
            ),
            (
                self.comm != "nccl" or self.device != "cpu",
                "comm 'nccl' needs a CUDA device, but device is 'cpu'; use comm=torch",
            ),
            (
                self.expert_tp in (None, 1, self.tp),
                f"expert_tp ({self.expert_tp}) must be 1 or tp ({self.tp}) (or None for tp)",
            ),
            (
                self.moe_dispatcher in DISPATCHERS,
                f"moe_dispatcher must be one of {DISPATCHERS}, got {self.moe_dispatcher!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.comm == "nccl":
            from megalith.kernels import nccl

            if not nccl.has_communicator():
                raise ValueError(
                    "comm 'nccl' needs megalith-kernels built with CUDA (this build has no NCCL communicator: "
                    "rebuild with MEGALITH_CUDA=ON); use comm=torch"
                )

    @property
    def resolved_expert_tp(self) -> int:
        """Tensor-parallel degree inside each expert (1 or tp)."""
        return self.tp if self.expert_tp is None else self.expert_tp

    def data_parallel(self, world_size: int) -> int:
        """dp for `world_size` ranks (expert parallelism included); raises naming the degrees when they do not fit."""
        other = self.tp * self.cp * self.pp
        degrees = (
            f"tp ({self.tp}) * cp ({self.cp}) * pp ({self.pp})" if self.cp > 1 else f"tp ({self.tp}) * pp ({self.pp})"
        )
        if world_size % other:
            raise ValueError(f"parallel: world size {world_size} is not divisible by {degrees}")
        dp = world_size // other
        if self.dp is not None and self.dp != dp:
            raise ValueError(f"parallel.dp ({self.dp}) does not match world size {world_size} / {degrees} = {dp}")
        if dp % self.ep:
            raise ValueError(
                f"parallel.ep ({self.ep}) does not divide the data-parallel size {dp} "
                f"(world size {world_size} / {degrees})"
            )
        return dp


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of each parallelism; their product is the world size.

    Build with `ParallelDims.from_env(...)` inside a torchrun (or `tests/harness.py`) world, or
    `ParallelDims.single_process()` for one process. The constructor itself works too: it validates the degrees
    against the current world and, when torch.distributed is initialised, builds every process group.
    """

    tp: int = 1
    """Tensor parallelism: weights of each layer split over this many ranks."""
    cp: int = 1
    """Context parallelism: the sequence of each sample split over this many ranks."""
    ep: int = 1
    """Expert parallelism: experts split over this many ranks (a data-like dimension for dense layers)."""
    dp: int = 1
    """Data parallelism (for expert parameters; dense parameters are replicated over ep * dp ranks)."""
    pp: int = 1
    """Pipeline parallelism: layers split into this many stages."""
    rank: int = field(init=False)
    world_size: int = field(init=False)
    _groups: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in DIM_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelDims.{name} must be a positive integer, got {value!r}")
        initialized = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if initialized else 1
        product = self.tp * self.cp * self.ep * self.dp * self.pp
        if product != world_size:
            formula = " * ".join(f"{n}({getattr(self, n)})" for n in DIM_NAMES)
            raise ValueError(f"ParallelDims: {formula} = {product} does not match the world size ({world_size})")
        object.__setattr__(self, "rank", dist.get_rank() if initialized else 0)
        object.__setattr__(self, "world_size", world_size)
        object.__setattr__(self, "_groups", _build_groups(self) if initialized else {})

    @classmethod
    def single_process(cls) -> ParallelDims:
        """All degrees 1; needs no torch.distributed (but works inside a world of size 1 too)."""
        return cls()

    @classmethod
    def from_env(
        cls, *, tp: int = 1, cp: int = 1, pp: int = 1, dp: int | None = None, ep: int = 1, backend: str | None = None
    ) -> ParallelDims:
        """Joins the torchrun world (`megalith.core.world.init_distributed`) and builds the dims over it.

        Args:
            tp, cp, pp: degrees of those dimensions.
            dp: data-parallel degree, expert parallelism included (the dims get dp / ep); None means whatever
                the world size leaves.
            ep: expert-parallel degree, carved out of dp.
            backend: process-group backend override (default: NCCL when CUDA is available, else gloo).
        """
        world_size = init_distributed(backend).world_size
        config = ParallelConfig(tp=tp, cp=cp, pp=pp, dp=dp, ep=ep)
        try:
            return cls.from_config(config, world_size)
        except ValueError as exc:
            raise ValueError(f"ParallelDims.from_env: {str(exc).removeprefix('parallel: ')}") from None

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> ParallelDims:
        """The topology `config` describes in a world of `world_size` ranks (torch.distributed initialised).

        `config.dp` counts every data-parallel rank; `ep` of them form the expert-parallel dimension, so the
        dims get `dp = config.dp / ep` (the expert-data-parallel degree).
        """
        dp = config.data_parallel(world_size)
        return cls(tp=config.tp, cp=config.cp, pp=config.pp, ep=config.ep, dp=dp // config.ep)

    def coordinate(self, name: str, rank: int | None = None) -> int:
        """This rank's (or `rank`'s) index along dimension `name`."""
        rank = self.rank if rank is None else rank
        for dim_name in DIM_NAMES:
            if dim_name == name:
                return rank % getattr(self, dim_name)
            rank //= getattr(self, dim_name)
        raise ValueError(f"ParallelDims: unknown dimension {name!r}; expected one of {DIM_NAMES}")

    @property
    def tp_rank(self) -> int:
        return self.coordinate("tp")

    @property
    def cp_rank(self) -> int:
        return self.coordinate("cp")

    @property
    def ep_rank(self) -> int:
        return self.coordinate("ep")

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")

    @property
    def pp_rank(self) -> int:
        return self.coordinate("pp")

    @property
    def data_parallel_size(self) -> int:
        """Ranks holding the same dense parameters and reading different data: ep * dp."""
        return self.ep * self.dp

    @property
    def data_rank(self) -> int:
        """This rank's data shard among `data_parallel_size` (its index in `data_group`)."""
        return self.ep_rank + self.ep * self.dp_rank

    @property
    def data_group(self) -> dist.ProcessGroup | None:
        """The ranks dense gradients are averaged over (and the loss): `group("ep", "dp")`."""
        return self.group("ep", "dp")

    def group(self, *names: str) -> dist.ProcessGroup | None:
        """The process group of ranks that differ only along `names` (e.g. `group("ep", "dp")`).

        Returns None in a single process (no torch.distributed); a dimension of degree 1 still has a real
        one-rank group when distributed, so the result is always safe to pass to a collective.
        """
        unknown = [n for n in names if n not in DIM_NAMES]
        if unknown or not names:
            raise ValueError(f"ParallelDims.group: expected names from {DIM_NAMES}, got {names}")
        if not self._groups:
            return None
        return self._groups[_key(self, names)]

    @property
    def tp_group(self) -> dist.ProcessGroup | None:
        return self.group("tp")

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.group("cp")

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.group("ep")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.group("pp")

    def grad_reduction(self, expert: bool = False) -> tuple[dist.ProcessGroup | None, int, int]:
        """(group, size, this rank's index) of the ranks a parameter's gradients are summed over, which ZeRO-1
        also shards its optimizer state over: every rank holding the same parameter and seeing other tokens.

        Dense parameters: `group("cp", "ep", "dp")`. Routed experts (`expert=True`): `group("cp", "dp")`, since
        the other ep ranks hold other experts. The index has cp fastest, then ep, then dp (the group's order).
        """
        if expert:
            return self.group("cp", "dp"), self.cp * self.dp, self.cp_rank + self.cp * self.dp_rank
        return self.group("cp", "ep", "dp"), self.cp * self.data_parallel_size, self.cp_rank + self.cp * self.data_rank

    def group_ranks(self, *names: str) -> list[int]:
        """Global ranks of this rank's group along `names`, in group-rank order."""
        return _members(self, _key(self, names), self.rank)


def _key(dims: ParallelDims, names) -> tuple[str, ...]:
    # Dimensions of degree 1 do not change a group, so groups are keyed by the non-trivial ones only.
    return tuple(n for n in DIM_NAMES if n in names and getattr(dims, n) > 1)


def _members(dims: ParallelDims, key: tuple[str, ...], rank: int) -> list[int]:
    """Ranks equal to `rank` in every coordinate outside `key`, ordered with the fastest dimension first."""
    coords = {n: dims.coordinate(n, rank) for n in DIM_NAMES}
    ranges = [range(getattr(dims, n)) if n in key else [coords[n]] for n in reversed(DIM_NAMES)]
    members = []
    for values in itertools.product(*ranges):  # slowest dimension first, so the fastest varies fastest
        rank_of = 0
        for n, v in zip(reversed(DIM_NAMES), values, strict=True):
            rank_of = rank_of * getattr(dims, n) + v
        members.append(rank_of)
    return members


def _build_groups(dims: ParallelDims) -> dict:
    """Creates one group per (set of non-trivial dimensions, member set); every rank calls new_group alike."""
    nontrivial = [n for n in DIM_NAMES if getattr(dims, n) > 1]
    groups: dict = {}
    for size in range(len(nontrivial) + 1):
        for key in itertools.combinations(nontrivial, size):
            partition = sorted({tuple(_members(dims, key, r)) for r in range(dims.world_size)})
            for members in partition:
                group = dist.new_group(list(members))
                if dims.rank in members:
                    groups[key] = group
    return groups
