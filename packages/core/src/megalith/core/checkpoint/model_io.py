"""Reading and writing model weights of a Megalith checkpoint one canonical tensor at a time (export/import)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megalith.core.checkpoint.layout import (
    MODEL_PREFIX,
    publish_checkpoint,
    read_info,
    resolve_checkpoint_dir,
    tmp_dir_name,
)
from megalith.core.checkpoint.sharded import _LOCAL, VERIFY_CHOICES, _record_other_files, verify_checkpoint_files
from megalith.core.checkpoint.storage import (
    CheckpointCorruptError,
    Chunk,
    ChunkReader,
    DataFileWriter,
    TensorEntry,
    TensorIndex,
    dtype_name,
    verify_file,
)

__all__ = ["ModelCheckpointReader", "write_model_checkpoint"]

_BATCH_BYTES = 1 << 30  # tensors are gathered into files of about this size while writing


class ModelCheckpointReader:
    """Full canonical model tensors from a checkpoint, read one at a time (whatever layout saved it).

    Args:
        path: a run's checkpoint root (its `latest` is followed) or one `iter_*` directory.
        verify: "checksum" (default) checks each data file's CRC32 the first time a tensor is read from it, and
            the small files (tokenizer, RNG states) at once; "size" checks file sizes only.
    """

    def __init__(self, path: str | os.PathLike, *, verify: str = "checksum") -> None:
        if verify not in VERIFY_CHOICES:
            raise ValueError(f"verify must be one of {VERIFY_CHOICES}, got {verify!r}")
        self.path = resolve_checkpoint_dir(path)
        self.info = read_info(self.path)
        self._index = TensorIndex.read(self.path)
        self._checksum = verify == "checksum"
        small = {n: r for n, r in self._index.files.items() if not n.endswith(".safetensors")}
        verify_checkpoint_files(self.path, TensorIndex({}, small), verify, process_group=_LOCAL)
        self._verified: set[str] = set(small)
        self._reader = ChunkReader(self.path)
        self._names = sorted(k[len(MODEL_PREFIX) :] for k in self._index.tensors if k.startswith(MODEL_PREFIX))

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
        return self._entry(name).shape

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The full canonical tensor `name` (on CPU, in the dtype it was saved in), or rows `rows` of it.

        With `rows` (a step-1 slice of dimension 0), only those rows' bytes are read from each saved chunk, so
        a large tensor (the embedding) can be streamed in row blocks with memory bounded by the block.
        """
        entry = self._entry(name)
        if rows is not None and not (isinstance(rows, slice) and entry.shape):
            raise TypeError(f"{name}: rows must be a slice of dimension 0 of a tensor with at least one dimension")
        start, stop = 0, entry.shape[0] if entry.shape else 0
        if rows is not None:
            start, stop, step = rows.indices(entry.shape[0])
            if step != 1:
                raise ValueError(f"{name}: rows must be a contiguous slice (step 1), got step {step}")
            stop = max(start, stop)
        out = torch.empty((stop - start, *entry.shape[1:]) if entry.shape else (), dtype=entry.dtype)
        for chunk in entry.chunks:
            self._verify(chunk)
            if not entry.shape:
                out.copy_(self._reader.read(chunk, entry.dtype, ()))
                continue
            lo, hi = max(start, chunk.offsets[0]), min(stop, chunk.offsets[0] + chunk.sizes[0])
            if lo >= hi:
                continue
            index = (slice(lo - chunk.offsets[0], hi - chunk.offsets[0]), *(slice(0, n) for n in chunk.sizes[1:]))
            dst = out[lo - start : hi - start]
            for d in range(1, len(entry.shape)):
                dst = dst.narrow(d, chunk.offsets[d], chunk.sizes[d])
            dst.copy_(self._reader.read(chunk, entry.dtype, index))
        return out

    def _verify(self, chunk: Chunk) -> None:
        if chunk.file in self._verified:
            return
        reason = verify_file(self.path, self._index.files[chunk.file], checksum=self._checksum)
        if reason is not None:
            raise CheckpointCorruptError(reason)
        self._verified.add(chunk.file)

    def _entry(self, name: str) -> TensorEntry:
        entry = self._index.tensors.get(MODEL_PREFIX + name)
        if entry is None:
            raise KeyError(f"{self.path}: no model tensor {name!r} (has {len(self._names)} tensors)")
        return entry


def write_model_checkpoint(
    out_dir: str | os.PathLike,
    model_config_dict: dict[str, Any] | None,
    named_tensors_iter: Iterable[tuple[str, torch.Tensor]],
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Writes full canonical tensors as a model-only checkpoint (step 0) under root `out_dir`.

    Training loads it at any (tp, pp, dp) layout. Tensors are consumed from the iterator and written in
    files of about 1 GiB, so at most one file's tensors are in memory. Returns the checkpoint directory.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_dir_name(0)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = DataFileWriter(tmp, "model", _BATCH_BYTES)
    entries: dict[str, TensorEntry] = {}
    for name, tensor in named_tensors_iter:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        key = MODEL_PREFIX + name
        if key in entries:
            raise ValueError(f"tensor {name!r} given twice")
        tensor = tensor.detach().to("cpu")
        shape = tuple(tensor.shape)
        dtype_name(tensor.dtype)  # refuses a dtype checkpoints cannot hold, naming it
        entries[key] = TensorEntry(shape, tensor.dtype, [Chunk("", key, (0,) * len(shape), shape)])
        writer.add(key, tensor)
    writer.flush()
    for key, entry in entries.items():
        entry.chunks = [Chunk(writer.file_of[key], key, c.offsets, c.sizes) for c in entry.chunks]
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    files = {r.name: r for r in writer.records}
    files.update(_record_other_files(tmp, files))
    TensorIndex(entries, files).write(tmp)
    return publish_checkpoint(
        root, 0, {"model_config": model_config_dict, "world_size": 1, "extra": {}, "has_optimizer": False}
    )
