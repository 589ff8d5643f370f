"""Sharded, reshardable tensor state keyed by canonical names and shapes, in Megalith's own checkpoint format.

Each rank hands in its local tensors with their placement (a `ShardSpec`, and for a ZeRO-style flat shard a
range of the flattened local tensor). Every local tensor becomes boxes of the canonical (global) tensor. Boxes
that several ranks hold (replicas across data parallelism, or a fully replicated tensor) are written once, by
the rank that so far writes the fewest bytes. Each rank writes its boxes into safetensors files of its own, and
rank 0 writes `index.json` (where every box lies, plus the size and CRC32 of every file; see `storage.py`).
Loading reads, for every box the loading rank holds, the overlapping parts of the saved boxes, so the layout at
load time (tp, pp, dp) need not match the one at save time. Nothing is ever unpickled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megalith.core.checkpoint.layout import INFO_FILE
from megalith.core.checkpoint.storage import (
    INDEX_FILE,
    CheckpointCorruptError,
    Chunk,
    ChunkReader,
    DataFileWriter,
    FileRecord,
    TensorEntry,
    TensorIndex,
    check_cover,
    dtype_from_name,
    dtype_name,
    record_file,
    verify_file,
)
from megalith.core.placement import ShardSpec

__all__ = [
    "VERIFY_CHOICES",
    "LocalShard",
    "TensorInfo",
    "load_sharded_state",
    "read_full_tensors",
    "read_tensor_metadata",
    "save_sharded_state",
    "verify_checkpoint_files",
]

VERIFY_CHOICES = ("checksum", "size")  # what loading checks of every file: size and CRC32, or the size only

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
        return LocalShard(value)
    raise TypeError(f"{name}: sharded state holds tensors or LocalShard objects, got {type(value).__name__}")


_LOCAL = object()  # a process_group value meaning "this process alone", even inside a distributed job


def _rank_world(group: Any) -> tuple[int, int]:
    if group is not _LOCAL and dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather(obj: Any, group: Any, world: int) -> list[Any]:
    """Every rank's `obj` (plain data: lists, tuples, strings, numbers), in rank order."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_on_any(errors: Iterable[str | None]) -> None:
    """Raises the first error any rank reported (the same on every rank, so none waits in a collective)."""
    for error in errors:
        if error is not None:
            raise OSError(error)


def _chunk_key(name: str, offsets: tuple[int, ...]) -> str:
    return f"{name}@{','.join(map(str, offsets))}"


# A box as ranks describe it to each other: (name, global offsets, sizes, global shape, dtype name).
_BoxInfo = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], str]
_BoxKey = tuple[str, tuple[int, ...]]


@dataclasses.dataclass
class _Plan:
    """Who writes which box: the same on every rank, computed from every rank's box list."""

    entries: dict[str, TensorEntry]  # chunks are filled in once the files are written
    owner: dict[_BoxKey, int]
    sizes: dict[_BoxKey, tuple[int, ...]]


def _global_plan(plans: list[list[_BoxInfo]]) -> _Plan:
    """Raises ValueError naming the tensor when ranks disagree on a shape or dtype, or boxes do not tile it."""
    entries: dict[str, TensorEntry] = {}
    holders: dict[_BoxKey, list[int]] = {}
    sizes_of: dict[_BoxKey, tuple[int, ...]] = {}
    for rank, plan in enumerate(plans):
        for name, offsets, sizes, shape, dtype in plan:
            key, sizes, shape = (name, tuple(offsets)), tuple(sizes), tuple(shape)
            entry = entries.setdefault(name, TensorEntry(shape, dtype_from_name(dtype, name), []))
            if entry.shape != shape or dtype_name(entry.dtype) != dtype:
                raise ValueError(
                    f"{name}: ranks disagree on the global shape or dtype ({entry.shape} {dtype_name(entry.dtype)} "
                    f"vs {shape} {dtype})"
                )
            if sizes_of.setdefault(key, sizes) != sizes:
                raise ValueError(f"{name}: ranks hold different boxes starting at {key[1]}")
            holders.setdefault(key, []).append(rank)
    load = [0] * len(plans)
    owner: dict[_BoxKey, int] = {}
    for key, ranks in holders.items():  # a shared box goes to the rank that so far writes the fewest bytes
        owner[key] = min(ranks, key=lambda r: load[r])
        load[owner[key]] += math.prod(sizes_of[key])
    by_tensor: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for (name, offsets), sizes in sizes_of.items():
        by_tensor.setdefault(name, []).append((offsets, sizes))
    for name, entry in entries.items():
        check_cover(name, entry.shape, by_tensor[name])
    return _Plan(entries, owner, sizes_of)


def save_sharded_state(
    state: Mapping[str, torch.Tensor | LocalShard],
    path: str | os.PathLike,
    *,
    process_group: Any = None,
    max_file_bytes: int = 1 << 30,
) -> None:
    """Saves `state` (canonical name -> local tensor or LocalShard) as one checkpoint in directory `path`.

    Collective over `process_group` (the default group when torch.distributed is initialised): every rank
    passes the same names with its own local parts. A plain tensor counts as the whole (replicated) tensor.
    Boxes held by several ranks are written once. Rank 0 also records the size and CRC32 of the other files
    already in `path` (RNG states, a tokenizer). A write error on any rank (a full disk names the path) is
    raised on every rank.
    """
    root = Path(path)
    rank, world = _rank_world(process_group)
    views: dict[_BoxKey, torch.Tensor] = {}
    local: list[_BoxInfo] = []
    for name, value in state.items():
        shard = _as_shard(name, value)
        dtype = dtype_name(shard.tensor.dtype)
        for offsets, sizes, view in shard.boxes(name):
            views[(name, offsets)] = view
            local.append((name, offsets, sizes, shard.global_shape, dtype))
    plan = _global_plan(_gather(local, process_group, world))
    error, records, file_of = None, [], {}
    try:
        root.mkdir(parents=True, exist_ok=True)
        writer = DataFileWriter(root, f"shard-{rank:05d}", max_file_bytes)
        for key, owner in plan.owner.items():
            if owner == rank:
                writer.add(_chunk_key(*key), views[key])
        writer.flush()
        records, file_of = [dataclasses.astuple(r) for r in writer.records], writer.file_of
    except OSError as exc:
        error = str(exc)
    results = _gather((error, records, file_of), process_group, world)
    _raise_on_any(e for e, _, _ in results)
    if rank == 0:
        try:
            files = {r[0]: FileRecord(*r) for _, recs, _ in results for r in recs}
            for (name, offsets), owner in plan.owner.items():
                key = _chunk_key(name, offsets)
                chunk = Chunk(results[owner][2][key], key, offsets, plan.sizes[(name, offsets)])
                plan.entries[name].chunks.append(chunk)
            files.update(_record_other_files(root, files))
            TensorIndex(plan.entries, files).write(root)
        except OSError as exc:
            error = str(exc)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=_global_rank(process_group, 0), group=process_group)
        error = box[0]
    _raise_on_any([error])


def _global_rank(group: Any, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _record_other_files(root: Path, data_files: Mapping[str, FileRecord]) -> dict[str, FileRecord]:
    """Size and CRC32 of every other regular file under `root` (RNG states, a tokenizer), for the manifest.

    Leftover data files of an earlier save into the same directory, hidden temporaries and the JSON
    descriptions themselves are skipped.
    """
    out = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if (
            not path.is_file()
            or path.is_symlink()
            or name in data_files
            or name in (INDEX_FILE, INFO_FILE)
            or name.endswith(".safetensors")
            or any(part.startswith(".") for part in path.relative_to(root).parts)
        ):
            continue
        out[name] = record_file(root, name)
    return out


def verify_checkpoint_files(
    root: str | os.PathLike, index: TensorIndex, verify: str = "checksum", *, process_group: Any = None
) -> None:
    """Checks every file of the manifest: its size always, its CRC32 unless `verify` is "size".

    Collective when torch.distributed is initialised: each rank sums a share of the files (balanced by size)
    and the ranks agree on the verdict, so every rank raises the same CheckpointCorruptError naming the first
    bad file. Summing runs on a few threads (zlib releases the GIL).
    """
    if verify not in VERIFY_CHOICES:
        raise ValueError(f"verify must be one of {VERIFY_CHOICES}, got {verify!r}")
    root = Path(root)
    rank, world = _rank_world(process_group)
    records = sorted(index.files.values(), key=lambda r: r.name)
    load, summed_here = [0] * world, set()
    for i in sorted(range(len(records)), key=lambda i: -records[i].size):
        owner = min(range(world), key=lambda r: load[r])
        load[owner] += records[i].size
        if owner == rank:
            summed_here.add(i)
    threads = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        reasons = list(
            pool.map(
                lambda i: verify_file(root, records[i], checksum=verify == "checksum" and i in summed_here),
                range(len(records)),
            )
        )
    if world > 1:
        flags = torch.tensor([r is not None for r in reasons], dtype=torch.int32)
        if dist.get_backend(process_group) == "nccl":
            flags = flags.cuda()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=process_group)
        bad = [i for i, f in enumerate(flags.tolist()) if f]
    else:
        bad = [i for i, r in enumerate(reasons) if r is not None]
    if bad:
        i = bad[0]
        raise CheckpointCorruptError(
            reasons[i] or f"{root / records[i].name}: corrupt or truncated (CRC32 mismatch, found by another rank)"
        )


def load_sharded_state(
    state: Mapping[str, torch.Tensor | LocalShard],
    path: str | os.PathLike,
    *,
    process_group: Any = None,
    strict: bool = True,
    verify: str = "checksum",
) -> list[str]:
    """Fills the local tensors of `state` in place from the checkpoint in `path`, whatever its layout.

    Collective over `process_group` when torch.distributed is initialised (the file check is shared). Every file
    is checked against the manifest first (`verify`: "checksum" or "size"). Returns the names absent from the
    checkpoint (only when `strict` is False; else a missing name raises).
    """
    root = Path(path)
    index = TensorIndex.read(root)
    verify_checkpoint_files(root, index, verify, process_group=process_group)
    return _fill_state(root, index, state, strict)


def _fill_state(root: Path, index: TensorIndex, state: Mapping[str, Any], strict: bool) -> list[str]:
    reader, missing = ChunkReader(root), []
    for name, value in state.items():
        shard = _as_shard(name, value)
        entry = index.tensors.get(name)
        if entry is None:
            if strict:
                raise KeyError(f"{root}: the checkpoint has no tensor {name!r}")
            missing.append(name)
            continue
        if entry.shape != shard.global_shape:
            raise ValueError(
                f"{name}: checkpoint shape {entry.shape} differs from the expected global shape {shard.global_shape}"
            )
        for offsets, sizes, view in shard.boxes(name):
            _fill_box(reader, entry, offsets, sizes, view)
    return missing


@torch.no_grad()
def _fill_box(reader: ChunkReader, entry: TensorEntry, offsets, sizes, view: torch.Tensor) -> None:
    """Copies into `view` (the global box at `offsets` of `sizes`) every overlapping part of the saved chunks."""
    for chunk in entry.chunks:
        lo = [max(a, b) for a, b in zip(offsets, chunk.offsets, strict=True)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)]
        if any(a >= b for a, b in zip(lo, hi, strict=True)):
            continue
        index = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets, strict=True))
        src = reader.read(chunk, entry.dtype, index)
        view[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))].copy_(src)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Canonical shape and saved dtype of one checkpoint tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def read_tensor_metadata(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of the checkpoint in `path` (reads only its index)."""
    index = TensorIndex.read(Path(path))
    return {name: TensorInfo(e.shape, e.dtype) for name, e in index.tensors.items()}


def read_full_tensors(path: str | os.PathLike, names: Iterable[str], *, verify: str = "checksum") -> dict:
    """Reads whole canonical tensors in this process alone (no collectives); returns name -> tensor."""
    root = Path(path)
    index = TensorIndex.read(root)
    verify_checkpoint_files(root, index, verify, process_group=_LOCAL)
    out = {}
    for name in names:
        entry = index.tensors.get(name)
        if entry is None:
            raise KeyError(f"{root}: the checkpoint has no tensor {name!r}")
        out[name] = torch.empty(entry.shape, dtype=entry.dtype)
    _fill_state(root, index, out, strict=True)
    return out
