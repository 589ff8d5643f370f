"""The bytes of a Megalith checkpoint: safetensors data files, a JSON tensor index, a manifest with CRC32 sums.

A checkpoint directory holds:

- data files (`*.safetensors`), each holding some chunks (boxes) of canonical tensors under keys such as
  `model/layers.0.attn.qkv.weight@128,0`;
- `index.json`: for each canonical tensor its global shape, dtype and chunks (file, key, offsets, sizes), and
  the manifest: the size and CRC32 of every other file of the checkpoint (data files, RNG states, tokenizer);
- `megalith.json` (see `layout.py`), written last.

Both JSON files carry a CRC32 of their own content. Nothing is ever unpickled: the JSON files are plain data,
and the data files are read by the `safetensors` library, whose header is JSON and whose payload is raw
little-endian bytes. Every read failure is reported as `<file>: corrupt or truncated (...)`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

__all__ = [
    "INDEX_FILE",
    "CheckpointCorruptError",
    "Chunk",
    "DataFileWriter",
    "FileRecord",
    "TensorEntry",
    "TensorIndex",
    "atomic_write_text",
    "check_crc",
    "checked_member",
    "dtype_from_name",
    "dtype_name",
    "dumps_checked",
    "file_crc32",
    "fsync_dir",
    "loads_checked",
    "probe_writable",
    "read_json",
    "storage_error",
]

INDEX_FILE = "index.json"
INDEX_FORMAT = "megalith-tensor-index"
INDEX_VERSION = 1
_BLOCK = 8 << 20  # bytes per read while checksumming

# Dtypes a checkpoint may hold: JSON name -> (torch dtype, safetensors code).
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
_NAMES = {dtype: name for name, (dtype, _) in _DTYPES.items()}
_MEMBER_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


class CheckpointCorruptError(ValueError):
    """A checkpoint file is missing, truncated, or differs from what the checkpoint recorded about it."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise TypeError(f"checkpoints cannot hold tensors of dtype {dtype} (supported: {sorted(_DTYPES)})")
    return _NAMES[dtype]


def dtype_from_name(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise CheckpointCorruptError(f"{where}: corrupt or truncated (unknown dtype {name!r})")
    return _DTYPES[name][0]


def storage_error(path: str | os.PathLike, exc: OSError, doing: str) -> OSError:
    """An OSError whose message names `path` and says plainly what went wrong (full disk, permissions...)."""
    reasons = {
        errno.ENOSPC: "no space left on",
        errno.EDQUOT: "disk quota exceeded on",
        errno.EROFS: "read-only file system at",
        errno.EACCES: "permission denied on",
        errno.EPERM: "permission denied on",
    }
    reason = reasons.get(exc.errno)
    message = f"{reason} {path} while {doing}" if reason else f"{path}: {doing} failed ({exc.strerror or exc})"
    error = OSError(message)  # one argument: str(error) is the message alone
    error.errno = exc.errno
    return error


def probe_writable(path: str | os.PathLike, what: str) -> None:
    """Creates directory `path` and writes a file in it now, so an unwritable one fails before work is done."""
    path = Path(path)
    probe = path / f".megalith-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        raise storage_error(path, exc, f"checking that {what} is writable") from None


# ---- self-checked JSON ----------------------------------------------------------------------------------


def _crc_of(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def dumps_checked(obj: Mapping[str, Any]) -> str:
    """JSON text of `obj` plus a `crc32` field over the rest, which `loads_checked` verifies."""
    body = {k: v for k, v in obj.items() if k != "crc32"}
    return json.dumps({**body, "crc32": _crc_of(body)}, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; unreadable or malformed content raises CheckpointCorruptError naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise storage_error(path, exc, "reading") from None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"{path}: corrupt or truncated (invalid JSON: {exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointCorruptError(f"{path}: corrupt or truncated (not a JSON object)")
    return obj


def check_crc(path: Path, obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without its `crc32` field, which must match the rest (as `dumps_checked` wrote it)."""
    body = {k: v for k, v in obj.items() if k != "crc32"}
    try:
        actual = _crc_of(body)
    except ValueError as exc:  # NaN/inf smuggled into the file
        raise CheckpointCorruptError(f"{path}: corrupt or truncated ({exc})") from None
    if obj.get("crc32") != actual:
        raise CheckpointCorruptError(
            f"{path}: corrupt or truncated (content CRC32 {actual}, recorded {obj.get('crc32')!r})"
        )
    return body


def loads_checked(path: Path) -> dict[str, Any]:
    """Reads a JSON object written by `dumps_checked`, checking its CRC32."""
    return check_crc(path, read_json(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to a temporary file next to `path`, fsyncs it and renames it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- files and the manifest -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """A file of the checkpoint (path relative to the checkpoint directory), its size and CRC32."""

    name: str
    size: int
    crc32: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "crc32": f"{self.crc32:08x}"}


def checked_member(root: Path, name: Any, where: str) -> Path:
    """`root / name` for a relative name that stays inside `root` (no `..`, absolute path or odd component).

    Symbolic links are refused too, so a crafted checkpoint cannot make Megalith read files elsewhere.
    """
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or not all(_MEMBER_PART.match(p) for p in parts) or any(p in (".", "..") for p in parts):
        raise CheckpointCorruptError(f"{where}: refusing file name {name!r} (it must stay inside {root})")
    path = root.joinpath(*parts)
    for sub in [root.joinpath(*parts[: i + 1]) for i in range(len(parts))]:
        if sub.is_symlink():
            raise CheckpointCorruptError(f"{where}: refusing {sub} (a symbolic link; files must stay inside {root})")
    return path


def file_crc32(path: Path) -> int:
    """CRC32 of a whole file, read in blocks (zlib releases the GIL, so files can be summed on threads)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_BLOCK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def record_file(root: Path, name: str) -> FileRecord:
    path = root / name
    return FileRecord(name, path.stat().st_size, file_crc32(path))


def verify_file(root: Path, record: FileRecord, *, checksum: bool) -> str | None:
    """None when the file matches its record, else the reason it does not (size always, CRC32 optionally)."""
    path = checked_member(root, record.name, f"{root / INDEX_FILE}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (the checkpoint's manifest lists it)"
    except OSError as exc:
        return str(storage_error(path, exc, "reading"))
    if size != record.size:
        return f"{path}: corrupt or truncated (size {size} bytes, the manifest records {record.size})"
    if checksum:
        try:
            crc = file_crc32(path)
        except OSError as exc:
            return str(storage_error(path, exc, "reading"))
        if crc != record.crc32:
            return f"{path}: corrupt or truncated (CRC32 {crc:08x}, the manifest records {record.crc32:08x})"
    return None


# ---- data files -----------------------------------------------------------------------------------------


def _payload(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (row-major, little-endian), without a copy when it is contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> FileRecord:
    """Writes `tensors` as one safetensors file, streaming each tensor's bytes; returns its size and CRC32.

    The format (an 8-byte little-endian header length, a JSON header, the payload) is written here rather than
    by `safetensors.torch.save_file` so the checksum is taken while writing (no second read) and tensors need
    no contiguous copy; files are read back by the `safetensors` library (tests check that it accepts them).
    """
    if sys.byteorder != "little":
        raise RuntimeError("Megalith checkpoints are written on little-endian machines only")
    header: dict[str, Any] = {}
    offset = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        code = _DTYPES[dtype_name(tensor.dtype)][1]
        header[key] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    prefix = len(head).to_bytes(8, "little") + head
    crc = zlib.crc32(prefix)
    try:
        with open(path, "wb") as f:
            f.write(prefix)
            for tensor in tensors.values():
                data = _payload(tensor)
                crc = zlib.crc32(data, crc)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise storage_error(path, exc, "writing a checkpoint") from None
    return FileRecord(path.name, len(prefix) + offset, crc)


class DataFileWriter:
    """Collects tensors and writes them into data files of about `max_bytes` each, named `{stem}-{i:03d}`.

    At most one file's worth of tensors is held at a time (the caller's tensors, not copies).
    """

    def __init__(self, root: Path, stem: str, max_bytes: int = 1 << 30) -> None:
        self.root, self.stem, self.max_bytes = root, stem, max_bytes
        self.records: list[FileRecord] = []
        self.file_of: dict[str, str] = {}
        self._batch: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.file_of or key in self._batch:
            raise ValueError(f"tensor {key!r} given twice")
        self._batch[key] = tensor
        self._bytes += tensor.numel() * tensor.element_size()
        if self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        name = f"{self.stem}-{len(self.records):03d}.safetensors"
        self.records.append(write_safetensors(self.root / name, self._batch))
        self.file_of.update(dict.fromkeys(self._batch, name))
        self._batch, self._bytes = {}, 0


class ChunkReader:
    """Reads (parts of) chunks from the data files of one checkpoint, keeping each file open once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[str, Any] = {}

    def _open(self, name: str):
        handle = self._files.get(name)
        if handle is None:
            from safetensors import SafetensorError, safe_open

            path = checked_member(self.root, name, str(self.root / INDEX_FILE))
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as exc:
                raise CheckpointCorruptError(f"{path}: corrupt or truncated ({exc})") from None
            except OSError as exc:
                raise storage_error(path, exc, "reading") from None
            self._files[name] = handle
        return handle

    def read(self, chunk: Chunk, dtype: torch.dtype, index: tuple[slice, ...]) -> torch.Tensor:
        """`index` (one slice per dimension, relative to the chunk) of one chunk, checked against the index."""
        from safetensors import SafetensorError

        where = self.root / chunk.file
        try:
            piece = self._open(chunk.file).get_slice(chunk.key)
            shape, code = tuple(piece.get_shape()), piece.get_dtype()
            if shape != chunk.sizes or code != _DTYPES[dtype_name(dtype)][1]:
                raise CheckpointCorruptError(
                    f"{where}: corrupt or truncated ({chunk.key!r} is {code}{list(shape)}, the index records "
                    f"{dtype_name(dtype)}{list(chunk.sizes)})"
                )
            if all(s.start == 0 and s.stop == n for s, n in zip(index, shape, strict=True)):
                return self._open(chunk.file).get_tensor(chunk.key)  # the whole chunk (also 0-d tensors)
            return piece[index]
        except SafetensorError as exc:
            raise CheckpointCorruptError(f"{where}: corrupt or truncated ({exc})") from None


# ---- the tensor index -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One saved box of a canonical tensor: its data file and key, global offsets and sizes."""

    file: str
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclasses.dataclass
class TensorEntry:
    """A canonical tensor of the checkpoint: global shape, dtype and the chunks that tile it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[Chunk]


@dataclasses.dataclass
class TensorIndex:
    """The `index.json` of a checkpoint: canonical tensors and the manifest of files."""

    tensors: dict[str, TensorEntry]
    files: dict[str, FileRecord]

    def write(self, root: Path) -> None:
        body = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "tensors": {
                name: {
                    "shape": list(e.shape),
                    "dtype": dtype_name(e.dtype),
                    "chunks": [[c.file, c.key, list(c.offsets), list(c.sizes)] for c in e.chunks],
                }
                for name, e in sorted(self.tensors.items())
            },
            "files": [r.to_json() for _, r in sorted(self.files.items())],
        }
        path = root / INDEX_FILE
        try:
            atomic_write_text(path, dumps_checked(body))
        except OSError as exc:
            raise storage_error(path, exc, "writing a checkpoint") from None

    @classmethod
    def read(cls, root: Path) -> TensorIndex:
        """Reads and validates `root/index.json` (every field's type, every file name, every chunk's box)."""
        path = root / INDEX_FILE
        if not path.is_file():
            legacy = root / ".metadata"
            if legacy.exists():
                raise CheckpointCorruptError(
                    f"{legacy}: a pickle-based (torch.distributed.checkpoint) index, written by Megalith 0.1 or "
                    f"another DCP tool. Megalith never unpickles checkpoint files (unpickling can run code), so "
                    f"this checkpoint cannot be loaded; re-save it with the version that wrote it as a Hugging "
                    f"Face directory (megalith-export hf) and import that"
                )
            raise FileNotFoundError(f"{root} is not a Megalith checkpoint (no {INDEX_FILE})")
        raw = loads_checked(path)
        try:
            return cls._parse(root, raw, str(path))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointCorruptError):
                raise
            raise CheckpointCorruptError(f"{path}: corrupt or truncated ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _parse(cls, root: Path, raw: dict[str, Any], where: str) -> TensorIndex:
        if raw.get("format") != INDEX_FORMAT or raw.get("version") != INDEX_VERSION:
            raise CheckpointCorruptError(
                f"{where}: not a Megalith tensor index this version reads (format {raw.get('format')!r}, "
                f"version {raw.get('version')!r})"
            )
        files: dict[str, FileRecord] = {}
        for item in _typed(raw["files"], list, "files"):
            name = _typed(item["name"], str, "files[].name")
            checked_member(root, name, where)
            size = _typed(item["size"], int, f"size of {name}")
            crc = int(_typed(item["crc32"], str, f"crc32 of {name}"), 16)
            if size < 0 or not 0 <= crc < 2**32 or name in files:
                raise ValueError(f"bad manifest entry {item}")
            files[name] = FileRecord(name, size, crc)
        tensors: dict[str, TensorEntry] = {}
        for name, entry in _typed(raw["tensors"], dict, "tensors").items():
            shape = _ints(entry["shape"], f"shape of {name}")
            dtype = dtype_from_name(entry["dtype"], where)
            chunks = []
            for file, key, offsets, sizes in _typed(entry["chunks"], list, f"chunks of {name}"):
                if file not in files:
                    raise ValueError(f"{name}: chunk file {file!r} is not in the manifest")
                chunk = Chunk(_typed(file, str, "file"), _typed(key, str, "key"), _ints(offsets, "offsets"),
                              _ints(sizes, "sizes"))  # fmt: skip
                if (
                    len(chunk.offsets) != len(shape)
                    or len(chunk.sizes) != len(shape)
                    or any(
                        o < 0 or s < 0 or o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, shape, strict=True)
                    )
                ):
                    raise ValueError(f"{name}: chunk at {list(chunk.offsets)} lies outside the shape {list(shape)}")
                chunks.append(chunk)
            check_cover(name, shape, [(c.offsets, c.sizes) for c in chunks])
            tensors[name] = TensorEntry(shape, dtype, chunks)
        return cls(tensors, files)


def _typed(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{what} must be a {kind.__name__}, got {value!r}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    values = tuple(_typed(v, int, what) for v in _typed(value, list, what))
    if any(v < 0 for v in values):
        raise ValueError(f"{what} must not be negative, got {list(values)}")
    return values


def check_cover(name: str, shape: tuple[int, ...], boxes: Iterable[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """The boxes must tile the tensor exactly (no gap, no overlap); raises ValueError naming the tensor."""
    boxes = sorted((tuple(o), tuple(s)) for o, s in boxes)
    total = sum(math.prod(s) for _, s in boxes)
    if total != math.prod(shape):
        raise ValueError(
            f"{name}: the shards cover {total} of {math.prod(shape)} elements of the global shape {tuple(shape)} "
            f"(missing or overlapping pieces)"
        )
    # Sorted by offsets, a box can only overlap boxes that start before it ends in dimension 0.
    boxes = [b for b in boxes if math.prod(b[1])]
    for i, (ao, asz) in enumerate(boxes):
        for bo, bsz in boxes[i + 1 :]:
            if shape and bo[0] >= ao[0] + asz[0]:
                break
            if all(a < b + bs and b < a + as_ for a, as_, b, bs in zip(ao, asz, bo, bsz, strict=True)):
                raise ValueError(f"{name}: shards at {ao} and {bo} overlap")
