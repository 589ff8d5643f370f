"""Sharded, reshardable tensor state on torch.distributed.checkpoint (DCP), keyed by canonical names and shapes.

Each rank hands in its local tensors with their placement (a `ShardSpec`, and for a ZeRO-style flat shard a
range of the flattened local tensor). The planners below turn every local tensor into boxes of the canonical
(global) tensor: one DCP chunk per box, with its global offsets. Boxes that several ranks hold (replicas across
data parallelism, or a fully replicated tensor) are written once. Loading asks DCP for exactly the boxes the
loading rank holds, so the layout at load time (tp, pp, dp) need not match the one at save time.

Nothing here unpickles arbitrary objects: tensors are read with `torch.load(weights_only=True)` by DCP, and the
DCP `.metadata` file is read with an unpickler that only accepts DCP's own metadata classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megalith.core.checkpoint.spec import ShardSpec

__all__ = [
    "LocalShard",
    "TensorInfo",
    "load_sharded_state",
    "read_tensor_metadata",
    "save_sharded_state",
]

Box = tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]  # (global offsets, sizes, local view)


class LocalShard:
    """One rank's part of a canonical tensor.

    Args:
        tensor: the local data. Without `flat_range` it has the local shape that `spec` describes (the full
            canonical shape when `spec` is None). With `flat_range` it is 1-D and holds elements
            `flat_range[0]:flat_range[1]` of the row-major flattening of that local tensor (a ZeRO shard).
        spec: placement of the local tensor in the canonical one; None means the local tensor is the whole
            canonical tensor (replicated).
        flat_range: (start, end) element range of the flattened local tensor held in `tensor`.
        local_shape: shape of the (unflattened) local tensor; required with `flat_range`.
    """

    def __init__(
        self,
        tensor: torch.Tensor,
        spec: ShardSpec | None = None,
        *,
        flat_range: tuple[int, int] | None = None,
        local_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.tensor = tensor
        self.spec = spec
        self.flat_range = flat_range
        if flat_range is None:
            self.local_shape = tuple(tensor.shape)
        else:
            if local_shape is None:
                raise ValueError("LocalShard: local_shape is required with flat_range")
            self.local_shape = tuple(local_shape)

    @property
    def global_shape(self) -> tuple[int, ...]:
        return tuple(self.spec.global_shape) if self.spec is not None else self.local_shape

    def validate(self, name: str) -> None:
        """Raises ValueError (naming the tensor) when the tensor, spec and range do not fit together."""
        shape, spec = self.local_shape, self.spec
        if self.flat_range is not None:
            start, end = self.flat_range
            if (
                self.tensor.dim() != 1
                or not 0 <= start <= end <= math.prod(shape)
                or self.tensor.numel() != end - start
            ):
                raise ValueError(
                    f"{name}: flat_range {self.flat_range} does not fit a 1-D tensor of {self.tensor.numel()} "
                    f"elements inside local shape {shape}"
                )
        if spec is None:
            return
        gshape = tuple(spec.global_shape)
        if len(gshape) != len(shape) or not 0 <= spec.dim < len(shape):
            raise ValueError(f"{name}: ShardSpec {spec} does not match local shape {shape} (rank or dim)")
        for d, (lsize, gsize) in enumerate(zip(shape, gshape, strict=True)):
            if d != spec.dim and lsize != gsize:
                raise ValueError(f"{name}: local shape {shape} differs from global {gshape} in unsharded dim {d}")
        taken: list[tuple[int, int]] = []
        for piece in spec.pieces:
            local_start, length, global_start = piece
            if length <= 0 or local_start < 0 or local_start + length > shape[spec.dim]:
                raise ValueError(f"{name}: piece {piece} lies outside local size {shape[spec.dim]} of dim {spec.dim}")
            if global_start < 0 or global_start + length > gshape[spec.dim]:
                raise ValueError(f"{name}: piece {piece} lies outside global size {gshape[spec.dim]} of dim {spec.dim}")
            if any(local_start < e and s < local_start + length for s, e in taken):
                raise ValueError(f"{name}: pieces {spec.pieces} overlap in the local tensor")
            taken.append((local_start, local_start + length))

    def boxes(self, name: str) -> list[Box]:
        """The canonical-tensor boxes this rank holds, each with a (writable) view of the local data."""
        self.validate(name)
        if self.flat_range is None:
            local = [((0,) * len(self.local_shape), self.local_shape, self.tensor)]
        else:
            local = []
            strides = _row_major_strides(self.local_shape)
            for offsets, sizes in _flat_range_boxes(self.local_shape, *self.flat_range):
                pos = sum(o * s for o, s in zip(offsets, strides, strict=True)) - self.flat_range[0]
                local.append((offsets, sizes, self.tensor[pos : pos + math.prod(sizes)].view(sizes)))
        if self.spec is None:
            return local
        dim, out = self.spec.dim, []
        for offsets, sizes, view in local:
            for local_start, length, global_start in self.spec.pieces:
                lo = max(offsets[dim], local_start)
                hi = min(offsets[dim] + sizes[dim], local_start + length)
                if lo >= hi:
                    continue  # this box lies in another piece, or in padding that is never saved
                goff = list(offsets)
                goff[dim] = global_start + lo - local_start
                gsize = list(sizes)
                gsize[dim] = hi - lo
                out.append((tuple(goff), tuple(gsize), view.narrow(dim, lo - offsets[dim], hi - lo)))
        return out


def _row_major_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


def _flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Splits elements [start, end) of a row-major tensor of `shape` into boxes, each contiguous in memory."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))] if shape else [((), ())]
    row = math.prod(shape[1:])
    s0, r0 = divmod(start, row)
    e0, r1 = divmod(end, row)

    def in_row(i: int, a: int, b: int):
        return [((i, *o), (1, *s)) for o, s in _flat_range_boxes(shape[1:], a, b)]

    if s0 == e0:
        return in_row(s0, r0, r1)
    out = []
    if r0:
        out += in_row(s0, r0, row)
        s0 += 1
    if e0 > s0:
        out.append(((s0,) + (0,) * (len(shape) - 1), (e0 - s0, *shape[1:])))
    if r1:
        out += in_row(e0, 0, r1)
    return out


def _as_shard(name: str, value: Any) -> LocalShard:
    if isinstance(value, LocalShard):
        return value
    if isinstance(value, torch.Tensor):
        return LocalShard(value, getattr(value, "megalith_shard", None))
    raise TypeError(f"{name}: sharded state holds tensors or LocalShard objects, got {type(value).__name__}")


class _ShardSavePlanner(SavePlanner):
    """Writes one DCP chunk per box; the coordinator drops boxes that several ranks hold (written once)."""

    def __init__(self, entries: Mapping[str, Any]) -> None:
        self.shards = {name: _as_shard(name, value) for name, value in entries.items()}
        self.views: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def set_up_planner(self, state_dict, storage_meta: StorageMeta | None = None, is_coordinator: bool = False):
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for name, shard in self.shards.items():
            props = TensorProperties.create_from_tensor(shard.tensor)
            for offsets, sizes, view in shard.boxes(name):
                self.views[(name, offsets)] = view
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items.append(
                    WriteItem(
                        index=MetadataIndex(name, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(chunk=chunk, properties=props, size=torch.Size(shard.global_shape)),
                    )
                )
        return SavePlan(items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        seen: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, ...], torch.Size]] = {}
        tensors: dict[str, TensorStorageMetadata] = {}
        # Give each shared box to the rank that so far writes the fewest bytes (spreads replicated tensors).
        load = [0] * len(all_plans)
        owner: dict[tuple[str, tuple[int, ...]], int] = {}
        holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for rank, plan in enumerate(all_plans):
            for item in plan.items:
                key = (item.index.fqn, tuple(item.index.offset))
                sizes = tuple(item.tensor_data.chunk.sizes)
                md = tensors.get(item.index.fqn)
                if md is None:
                    md = tensors[item.index.fqn] = TensorStorageMetadata(
                        properties=item.tensor_data.properties, size=item.tensor_data.size, chunks=[]
                    )
                elif md.size != item.tensor_data.size:
                    raise ValueError(
                        f"{item.index.fqn}: ranks disagree on the global shape ({tuple(md.size)} vs "
                        f"{tuple(item.tensor_data.size)})"
                    )
                holders.setdefault(key, []).append(rank)
                if key in seen:
                    if seen[key][0] != sizes:
                        raise ValueError(f"{item.index.fqn}: ranks hold different boxes starting at {key[1]}")
                    continue
                seen[key] = (sizes, item.tensor_data.size)
                md.chunks.append(item.tensor_data.chunk)
        for key in seen:
            best = min(holders[key], key=lambda r: load[r])
            owner[key] = best
            load[best] += math.prod(seen[key][0])
        for name, md in tensors.items():
            _check_cover(name, md)
        new_plans = [
            dataclasses.replace(plan, items=[i for i in plan.items if owner[_key(i)] == rank])
            for rank, plan in enumerate(all_plans)
        ]
        return new_plans, Metadata(state_dict_metadata=dict(tensors))

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        view = self.views[_key(write_item)].detach()
        return view.to("cpu").contiguous()


def _key(item: WriteItem) -> tuple[str, tuple[int, ...]]:
    return (item.index.fqn, tuple(item.index.offset))


def _check_cover(name: str, md: TensorStorageMetadata) -> None:
    """The saved boxes must tile the canonical tensor exactly (no gap, no overlap)."""
    total = sum(math.prod(c.sizes) for c in md.chunks)
    if total != math.prod(md.size):
        raise ValueError(
            f"{name}: the ranks' shards cover {total} of {math.prod(md.size)} elements of the global shape "
            f"{tuple(md.size)} (missing or overlapping pieces)"
        )
    chunks = sorted(md.chunks, key=lambda c: tuple(c.offsets))
    for i, a in enumerate(chunks):
        for b in chunks[i + 1 : i + 1 + 64]:
            if all(
                ao < bo + bs and bo < ao + as_
                for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
            ):
                raise ValueError(f"{name}: shards at {tuple(a.offsets)} and {tuple(b.offsets)} overlap")


class _ShardLoadPlanner(LoadPlanner):
    """Reads, for every local box, the overlapping parts of whatever boxes the checkpoint holds."""

    def __init__(self, entries: Mapping[str, Any], strict: bool) -> None:
        self.shards = {name: _as_shard(name, value) for name, value in entries.items()}
        self.strict = strict
        self.views: dict[str, list[torch.Tensor]] = {}
        self.missing: list[str] = []

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for name, shard in self.shards.items():
            md = self.metadata.state_dict_metadata.get(name)
            if md is None:
                if self.strict:
                    raise KeyError(f"the checkpoint has no tensor {name!r}")
                self.missing.append(name)
                continue
            if not isinstance(md, TensorStorageMetadata):
                raise ValueError(f"{name}: the checkpoint entry is not a tensor")
            if tuple(md.size) != shard.global_shape:
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(md.size)} differs from the expected global shape "
                    f"{shard.global_shape}"
                )
            boxes = shard.boxes(name)
            self.views[name] = [view for _, _, view in boxes]
            chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s, _ in boxes]
            items += create_read_items_for_chunk_list(name, md, chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise ValueError(f"{read_item.dest_index.fqn}: refusing to load a pickled (non-tensor) checkpoint entry")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        view = self.views[read_item.dest_index.fqn][read_item.dest_index.index]
        for d, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(d, offset, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of the destination, which DCP has already filled


# DCP writes its `.metadata` with pickle; only these classes (and plain containers) may appear in it.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "layout"),
    ("torch", "memory_format"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch", "preserve_format"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "getattr"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """A DCP FileSystemReader whose `.metadata` unpickler accepts only DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} is not a sharded checkpoint (no {path.name} file)")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not a DCP metadata file")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_sharded_state(
    state: Mapping[str, torch.Tensor | LocalShard],
    path: str | os.PathLike,
    *,
    process_group: Any = None,
    thread_count: int = 1,
) -> None:
    """Saves `state` (canonical name -> local tensor or LocalShard) as one DCP checkpoint in directory `path`.

    Collective over `process_group` (the default group when torch.distributed is initialised): every rank
    passes the same names with its own local parts. A plain tensor uses its `megalith_shard` attribute when
    present, else counts as the whole (replicated) tensor. Boxes held by several ranks are written once.
    """
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=thread_count)
    with _plain_errors():
        dcp.save({}, storage_writer=writer, planner=_ShardSavePlanner(state), process_group=process_group)


def load_sharded_state(
    state: Mapping[str, torch.Tensor | LocalShard],
    path: str | os.PathLike,
    *,
    process_group: Any = None,
    strict: bool = True,
) -> list[str]:
    """Fills the local tensors of `state` in place from the DCP checkpoint in `path`, whatever its layout.

    Returns the names absent from the checkpoint (only when `strict` is False; else a missing name raises).
    """
    planner = _ShardLoadPlanner(state, strict)
    with _plain_errors():
        dcp.load({}, storage_reader=SafeFileSystemReader(path), planner=planner, process_group=process_group)
    return planner.missing


@contextlib.contextmanager
def _plain_errors():
    """Re-raises the first failing rank's own exception instead of DCP's CheckpointException (a BaseException).

    Also silences DCP's warning that it runs in a single process when torch.distributed is not initialised.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            yield
    except CheckpointException as exc:
        rank = min(exc.failures)
        inner = exc.failures[rank][0]
        if isinstance(inner, Exception):
            raise inner from None
        raise RuntimeError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Canonical shape and saved dtype of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def read_tensor_metadata(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of the DCP checkpoint in `path` (reads only the metadata file)."""
    md = SafeFileSystemReader(path).read_metadata()
    return {
        name: TensorInfo(tuple(m.size), m.properties.dtype)
        for name, m in md.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }


def read_full_tensors(path: str | os.PathLike, names: Iterable[str], metadata: Metadata | None = None):
    """Reads whole canonical tensors (one process, no collectives); returns name -> tensor."""
    reader = SafeFileSystemReader(path)
    md = metadata if metadata is not None else reader.read_metadata()
    out = {}
    for name in names:
        m = md.state_dict_metadata.get(name)
        if not isinstance(m, TensorStorageMetadata):
            raise KeyError(f"{path}: the checkpoint has no tensor {name!r}")
        out[name] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    reader.set_up_storage_reader(md, True)
    planner = _ShardLoadPlanner(out, strict=True)
    planner.set_up_planner({}, md, True)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    reader.read_data(plan, planner).wait()
    return out
