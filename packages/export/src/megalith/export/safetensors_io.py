"""Safetensors files: read through the `safetensors` library one tensor per open; written by a streaming writer.

Reading: `safetensors.safe_open` checks the whole header (its length, the dtypes, shapes and offsets, which must
cover the data exactly) and maps the file. The mapped pages a read touches count in the process's resident memory
for as long as the file stays open, so one handle held through an export grows to the whole file: reading every
tensor of a 168 MB file through one handle raised the peak RSS by 177 MB, against 14-18 MB for a whole HF or
TensorRT-LLM export when each read opens the file, takes its tensor (or row block) and closes it again, which is
what `SafetensorsReader` does (the header is parsed again per read; it is small next to a tensor). A tensor read
this way is a private copy-on-write view of the file, loaded as it is touched: changing it never changes the file,
but a file truncated by someone else while such a tensor is alive faults the process (SIGBUS) when it is touched,
as with any memory-mapped reader; the exporters convert and write each tensor straight away.

Writing: the library's `save_file` needs every tensor of a file in memory at once (169 MB peak for the same file),
so `SafetensorsWriter` is our own: it lays out the header from a manifest known in advance, then puts each tensor,
or row block, into its slot as it arrives. Format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megalith.export.paths import require_file
from megalith.export.spec import ConversionError

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


class SafetensorsError(ConversionError):
    """A safetensors file is unreadable or malformed, or lacks the tensor asked for."""


def tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    """Names, dtypes and shapes of one safetensors file, and its tensors read one at a time.

    Raises `SafetensorsError` ("<file>: corrupt or truncated (...)") for a malformed file, here or on a later read
    (the file is checked again on every open, so one damaged after this reader was made is caught too).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with self._open() as f:
            self.metadata: dict[str, str] = f.metadata() or {}
            self._entries: dict[str, tuple[str, tuple[int, ...]]] = {}
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                part = f.get_slice(name)
                self._entries[name] = (part.get_dtype(), tuple(part.get_shape()))

    @contextlib.contextmanager
    def _open(self) -> Iterator:
        require_file(self.path)
        try:
            handle = safe_open(str(self.path), framework="pt")
        except SafetensorError as exc:
            detail = str(exc).removeprefix("Error while deserializing header: ")
            raise SafetensorsError(f"{self.path}: corrupt or truncated ({detail})") from None
        except OSError as exc:
            raise SafetensorsError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        with handle as f:
            yield f

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype_tag(self, name: str) -> str:
        """The stored dtype as the format names it (F32, BF16, ...)."""
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        tag = self._entry(name)[0]
        if tag not in TAG_TO_DTYPE:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {tag}, which is not read here")
        return TAG_TO_DTYPE[tag]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only rows `rows` (a step-1 slice of dimension 0) of it."""
        shape = self.shape(name)
        self.dtype(name)  # refuses dtypes outside DTYPE_TO_TAG
        if rows is not None:
            if not shape:
                raise SafetensorsError(f"{self.path}: tensor {name!r} is a scalar; it has no rows to slice")
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise SafetensorsError(f"{self.path}: row slices must have step 1, got {step} for {name!r}")
            stop = max(start, stop)
        with self._open() as f:
            try:
                part = f.get_slice(name)
            except SafetensorError:
                part = None
            if part is None or part.get_dtype() != self.dtype_tag(name) or tuple(part.get_shape()) != shape:
                raise SafetensorsError(
                    f"{self.path}: corrupt or truncated (tensor {name!r} changed since it was opened)"
                )
            return f.get_tensor(name) if rows is None else part[start:stop]

    def _entry(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name not in self._entries:
            raise SafetensorsError(f"{self.path}: has no tensor named {name!r}")
        return self._entries[name]


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
