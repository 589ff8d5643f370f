"""Reading and writing model weights of a Megalith checkpoint one canonical tensor at a time (export/import)."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan

from megalith.core.checkpoint.layout import (
    MODEL_PREFIX,
    publish_checkpoint,
    read_info,
    resolve_checkpoint_dir,
    tmp_dir_name,
)
from megalith.core.checkpoint.sharded import (
    SafeFileSystemReader,
    _ShardSavePlanner,
    read_full_tensors,
)

__all__ = ["ModelCheckpointReader", "write_model_checkpoint"]

_BATCH_BYTES = 1 << 30  # tensors are gathered into files of about this size while writing


class ModelCheckpointReader:
    """Full canonical model tensors from a checkpoint, read one at a time (whatever layout saved it).

    Args:
        path: a run's checkpoint root (its `latest` is followed) or one `iter_*` directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_checkpoint_dir(path)
        self.info = read_info(self.path)
        self._metadata = SafeFileSystemReader(self.path).read_metadata()
        self._names = sorted(
            key[len(MODEL_PREFIX) :] for key in self._metadata.state_dict_metadata if key.startswith(MODEL_PREFIX)
        )

    @property
    def step(self) -> int:
        return int(self.info["step"])

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The model configuration in `ModelConfig.to_dict()` form (None when the checkpoint has none)."""
        return self.info.get("model_config")

    @property
    def tokenizer_dir(self) -> Path | None:
        tok = self.path / "tokenizer"
        return tok if tok.is_dir() else None

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._md(name).size)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The full canonical tensor `name` (on CPU, in the dtype it was saved in), or rows `rows` of it.

        With `rows` (a step-1 slice of dimension 0), only those rows' bytes are read from each saved chunk, so
        a large tensor (the embedding) can be streamed in row blocks with memory bounded by the block. Either way
        the bytes go straight from the files into the result (one copy of the tensor in memory).
        """
        md = self._md(name)
        if rows is None:
            if len(md.size) == 0:
                return read_full_tensors(self.path, [MODEL_PREFIX + name], self._metadata)[MODEL_PREFIX + name]
            rows = slice(0, md.size[0])  # read straight into the result (DCP would hold each chunk twice)
        if not isinstance(rows, slice) or len(md.size) == 0:
            raise TypeError(f"{name}: rows must be a slice of dimension 0 of a tensor with at least one dimension")
        start, stop, step = rows.indices(md.size[0])
        if step != 1:
            raise ValueError(f"{name}: rows must be a contiguous slice (step 1), got step {step}")
        stop = max(start, stop)
        out = torch.empty((stop - start, *md.size[1:]), dtype=md.properties.dtype)
        for chunk in md.chunks:
            c0, cn = chunk.offsets[0], chunk.sizes[0]
            lo, hi = max(start, c0), min(stop, c0 + cn)
            if lo >= hi:
                continue
            info = self._metadata.storage_data[MetadataIndex(MODEL_PREFIX + name, chunk.offsets)]
            dst = out[lo - start : hi - start]
            for d in range(1, len(md.size)):
                dst = dst.narrow(d, chunk.offsets[d], chunk.sizes[d])
            self._read_chunk_rows(name, info, tuple(chunk.sizes), lo - c0, dst)
        return out

    def _read_chunk_rows(self, name, info: _StorageInfo, sizes, r0: int, dst: torch.Tensor) -> None:
        """Fills `dst` with rows r0:r0 + len(dst) of one saved chunk, read from the bytes of its storage record
        (into `dst` itself when it is contiguous) without loading the rest of the chunk."""
        path = self.path / info.relative_path
        r1 = r0 + dst.shape[0]
        with open(path, "rb", buffering=0) as f:
            located = None
            if not getattr(info, "transform_descriptors", None) and sys.byteorder == "little":
                located = _locate_storage(_FileSlice(f, info.offset, info.length), sizes, dst.dtype)
            if located is None:  # an unusual record (transformed, or not one contiguous storage): load it whole
                f.seek(info.offset)
                whole = torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)
                dst.copy_(whole[r0:r1])
                return
            row_bytes = math.prod(sizes[1:]) * dst.element_size()
            target = dst if dst.is_contiguous() else torch.empty(dst.shape, dtype=dst.dtype)
            nbytes = (r1 - r0) * row_bytes
            if nbytes:
                view, done = memoryview(target.reshape(-1).view(torch.uint8).numpy()), 0
                f.seek(info.offset + located + r0 * row_bytes)
                while done < nbytes:
                    got = f.readinto(view[done:])
                    if not got:
                        raise ValueError(f"{path}: the stored chunk of {name!r} is truncated")
                    done += got
        if target is not dst:
            dst.copy_(target)

    def _md(self, name: str):
        md = self._metadata.state_dict_metadata.get(MODEL_PREFIX + name)
        if md is None:
            raise KeyError(f"{self.path}: no model tensor {name!r} (has {len(self._names)} tensors)")
        return md


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open binary file."""

    def __init__(self, f, offset: int, length: int) -> None:
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def _locate_storage(stream: _FileSlice, sizes, dtype: torch.dtype) -> int | None:
    """Byte offset, within a saved chunk's `torch.save` record, of its tensor's first element; None when the
    record is not a single contiguous little-endian tensor of the expected shape and dtype."""
    try:
        archive = torch._C.PyTorchFileReader(stream)
        records = [r for r in archive.get_all_records() if r.startswith("data/") or "/data/" in r]
        storages = [r for r in records if r.rpartition("data/")[2].isdigit()]
        if len(storages) != 1:
            return None
        if archive.has_record("byteorder") and bytes(archive.get_record("byteorder")).strip() != b"little":
            return None
        stream.seek(0)
        with torch.serialization.skip_data():  # tensor metadata only; the storage bytes are not read
            meta = torch.load(stream, map_location="cpu", weights_only=True)
        if (
            not isinstance(meta, torch.Tensor)
            or tuple(meta.shape) != tuple(sizes)
            or meta.dtype != dtype
            or not meta.is_contiguous()
        ):
            return None
        key = storages[0].rpartition("data/")[2]
        return archive.get_record_offset(f"data/{key}") + meta.storage_offset() * meta.element_size()
    except Exception:  # any surprise in these torch internals: the caller loads the record whole
        return None


def write_model_checkpoint(
    out_dir: str | os.PathLike,
    model_config_dict: dict[str, Any] | None,
    named_tensors_iter: Iterable[tuple[str, torch.Tensor]],
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Writes full canonical tensors as a model-only checkpoint (step 0) under root `out_dir`.

    Training loads it at any (tp, pp, dp) layout. Tensors are consumed from the iterator and written in
    batches of about 1 GiB, so at most one batch is in memory. Returns the checkpoint directory.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_dir_name(0)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
    writer.set_up_storage_writer(True)
    items, results, batch, batch_bytes, seen = [], [], {}, 0, set()

    def flush(index: int) -> None:
        planner = _ShardSavePlanner(batch)
        planner.set_up_planner({}, None, True)
        plan = planner.create_local_plan()
        plan = dataclasses.replace(plan, storage_data=_StoragePrefix(f"__0_{index}_"))
        items.extend(plan.items)
        results.append(writer.write_data(plan, planner).wait())

    num_batches = 0
    for name, tensor in named_tensors_iter:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        batch[MODEL_PREFIX + name] = tensor.detach().to("cpu")
        batch_bytes += tensor.numel() * tensor.element_size()
        if batch_bytes >= _BATCH_BYTES:
            flush(num_batches)
            num_batches, batch, batch_bytes = num_batches + 1, {}, 0
    if batch or num_batches == 0:
        flush(num_batches)
    _, metadata = create_default_global_save_plan([SavePlan(items)])
    writer.finish(metadata, results)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    return publish_checkpoint(
        root, 0, {"model_config": model_config_dict, "world_size": 1, "extra": {}, "has_optimizer": False}
    )
