"""Streaming safetensors reading and writing: one tensor at a time, without mmap and without the safetensors package.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
then the raw little-endian tensor bytes. Reading uses positioned reads (so resident memory is one tensor, not the
mapped file); writing lays out the header from a known manifest first and then seeks to each tensor's slot.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

DTYPE_TO_TAG = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TAG_TO_DTYPE = {tag: dtype for dtype, tag in DTYPE_TO_TAG.items()}
# Limit on the JSON header a reader accepts (the reference implementation uses the same 100 MB bound).
_MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """A safetensors file is malformed or does not hold what was asked for."""


def tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """Returns ({name: {"dtype", "shape", "data_offsets"}}, metadata, byte offset of the data section)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER or 8 + length > size:
            raise SafetensorsError(f"{path}: header length {length} does not fit in a file of {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise SafetensorsError(f"{path}: entry {name!r} lacks dtype/shape/data_offsets")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end or data_start + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} data_offsets {entry['data_offsets']} exceed the file")
    return header, metadata, data_start


class SafetensorsReader:
    """Reads tensors from one safetensors file by name; each read copies just that tensor's bytes into memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries, self.metadata, self._data_start = read_header(self.path)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        tag = self._entry(name)["dtype"]
        if tag not in TAG_TO_DTYPE:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {tag}")
        return TAG_TO_DTYPE[tag]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows `rows` (a step-1 slice of dimension 0) of it."""
        entry = self._entry(name)
        dtype, shape = self.dtype(name), tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        expected = tensor_nbytes(dtype, shape)
        if end - begin != expected:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} holds {end - begin} bytes, but {entry['dtype']} {list(shape)} "
                f"needs {expected}"
            )
        if rows is not None:
            if not shape:
                raise SafetensorsError(f"{self.path}: tensor {name!r} is a scalar; it has no rows to slice")
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise SafetensorsError(f"{self.path}: row slices must have step 1, got {step} for {name!r}")
            stop = max(start, stop)
            row_bytes = tensor_nbytes(dtype, shape[1:])
            begin, shape = begin + start * row_bytes, (stop - start, *shape[1:])
            expected = (stop - start) * row_bytes
        if expected == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = torch.empty(expected, dtype=torch.uint8)  # read straight into the tensor's storage
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            view, done = memoryview(buffer.numpy()), 0
            while done < expected:
                got = f.readinto(view[done:])
                if not got:
                    raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated")
                done += got
        return buffer.view(dtype).reshape(shape)

    def _entry(self, name: str) -> dict:
        if name not in self.entries:
            raise SafetensorsError(f"{self.path}: has no tensor named {name!r}")
        return self.entries[name]


class SafetensorsWriter:
    """Writes a safetensors file whose names, dtypes and shapes are all known up front, one tensor at a time.

    The header is written first; `write(name, tensor)` puts each tensor's bytes at its slot (any order) after
    checking its dtype and shape against the manifest; `close()` fails if a tensor was never written.
    """

    def __init__(
        self, path: str | os.PathLike, manifest: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None
    ):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, dtype, shape in manifest:
            if name in self._slots:
                raise ValueError(f"{self.path}: tensor {name!r} appears twice in the manifest")
            nbytes = tensor_nbytes(dtype, shape)
            header[name] = {
                "dtype": DTYPE_TO_TAG[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._slots[name] = (dtype, tuple(shape), offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        self._data_start = 8 + len(raw)
        self.total_bytes = offset
        self._pending = set(self._slots)
        self._rows_done: dict[str, int] = {}
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close() or abort())
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise ValueError(f"{self.path}: tensor {name!r} is not in this file's manifest")
        dtype, shape, offset = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}"
            )
        if name not in self._pending or name in self._rows_done:
            raise ValueError(f"{self.path}: tensor {name!r} was written twice")
        self._put(offset, tensor)
        self._pending.discard(name)

    def write_rows(self, name: str, start: int, block: torch.Tensor) -> None:
        """Writes rows start .. start + len(block) - 1 of tensor `name`; it is complete once every row is written.

        For streaming a large tensor (an embedding) in row blocks; blocks must not overlap.
        """
        if name not in self._slots:
            raise ValueError(f"{self.path}: tensor {name!r} is not in this file's manifest")
        dtype, shape, offset = self._slots[name]
        if not shape or block.dtype != dtype or tuple(block.shape[1:]) != shape[1:]:
            raise ValueError(
                f"{self.path}: row block of {name!r} is {block.dtype} {list(block.shape)}, expected {dtype} rows "
                f"of {list(shape)}"
            )
        if name not in self._pending or not 0 <= start <= start + block.shape[0] <= shape[0]:
            raise ValueError(
                f"{self.path}: rows {start}..{start + block.shape[0]} of {name!r} do not fit {list(shape)}"
            )
        self._put(offset + start * tensor_nbytes(dtype, shape[1:]), block)
        done = self._rows_done.get(name, 0) + block.shape[0]
        self._rows_done[name] = done
        if done == shape[0]:
            self._pending.discard(name)
        elif done > shape[0]:
            raise ValueError(f"{self.path}: more rows than {list(shape)} written to {name!r}")

    def _put(self, byte_offset: int, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu()
        self._file.seek(self._data_start + byte_offset)
        if data.numel():
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._pending:
            raise ValueError(f"{self.path}: tensors never written: {sorted(self._pending)}")

    def abort(self) -> None:
        self._file.close()
