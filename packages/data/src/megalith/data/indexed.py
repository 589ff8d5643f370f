"""Megatron-LM compatible indexed datasets: token sequences in `prefix.bin`, their layout in `prefix.idx`.

The byte layout is documented in packages/data/README.md ("The .bin/.idx format"). Reading maps both files
with mmap, checks every entry of the index once, and hands out numpy views (no copies); writing streams tokens
to a temporary `.bin` and renames both files into place only once the `.idx` is complete.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import struct
from array import array
from pathlib import Path

import numpy as np

from megalith.data.errors import names_file

__all__ = [
    "DTYPE_CODES",
    "HEADER_SIZE",
    "MAGIC",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "dtype_code",
    "optimal_dtype",
]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic (9) + version u64 (8) + dtype code u8 (1) + sequence count u64 (8) + document count u64 (8)
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_HEADER = struct.Struct("<9sQBQQ")
# Entries checked per numpy step when opening: enough to make the per-step overhead negligible, few enough that the
# temporaries (2 MB) stay in the CPU cache, which measured faster than larger steps.
_CHECK_CHUNK = 1 << 18


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair is malformed; the message names the file, what was expected and what was found."""


def dtype_code(dtype) -> int:
    """The `.idx` code of a numpy dtype (raises for dtypes the format cannot hold)."""
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise ValueError(
        f"dtype {dtype} cannot be stored in an indexed dataset; use one of {sorted(map(str, DTYPE_CODES.values()))}"
    )


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary: uint16 below 65,500 ids (Megatron-LM's rule), int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def _paths(prefix) -> tuple[str, str]:
    prefix = os.fspath(prefix)
    return prefix + ".bin", prefix + ".idx"


def _map(path: str) -> tuple[mmap.mmap | None, memoryview | bytes]:
    """Read-only mmap of a file (empty files cannot be mapped; they read as b"")."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None, b""
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return mapped, memoryview(mapped)


class IndexedDataset:
    """A read-only, zero-copy view of a Megatron-format dataset `prefix.bin` + `prefix.idx`.

    `ds[i]` is sequence i as a numpy array (a view into the mmap), `ds[a:b]` a list of them, `ds.get(i, offset,
    length)` a part of one. Pickling stores only the prefix, so data-loader workers re-open their own maps.

    Args:
        prefix: path without the `.bin`/`.idx` extension.
        multimodal: the `.idx` carries a per-sequence int8 mode array after the document indices.
    """

    def __init__(self, prefix, multimodal: bool = False) -> None:
        self.prefix = os.fspath(prefix)
        self.multimodal = bool(multimodal)
        self._open()

    # -- opening and validation ------------------------------------------------------------------------------
    def _open(self, check_entries: bool = True) -> None:
        bin_path, idx_path = _paths(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file {path} does not exist")
        self._idx_map, idx = _map(idx_path)
        idx_size = len(idx)
        if idx_size < HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path}: truncated index, expected at least a {HEADER_SIZE}-byte header, found {idx_size} bytes"
            )
        magic, version, code, num_sequences, num_doc_indices = _HEADER.unpack_from(idx, 0)
        if magic != MAGIC:
            raise IndexedDatasetError(f"{idx_path}: bad magic, expected {MAGIC!r}, found {bytes(magic)!r}")
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: unknown version, expected {VERSION}, found {version}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{idx_path}: unknown dtype code, expected one of {sorted(DTYPE_CODES)}, found {code}"
            )
        self.dtype = DTYPE_CODES[code]
        expected = HEADER_SIZE + 12 * num_sequences + 8 * num_doc_indices + (num_sequences if self.multimodal else 0)
        if idx_size != expected:
            hint = ""
            if not self.multimodal and idx_size == expected + num_sequences:
                hint = " (it looks multimodal: open it with multimodal=True)"
            raise IndexedDatasetError(
                f"{idx_path}: {'truncated' if idx_size < expected else 'oversized'} index, expected {expected} bytes "
                f"for {num_sequences} sequences and {num_doc_indices} document indices, found {idx_size} bytes{hint}"
            )
        offset = HEADER_SIZE
        self._lengths = np.frombuffer(idx, np.int32, num_sequences, offset)
        offset += 4 * num_sequences
        self._pointers = np.frombuffer(idx, np.int64, num_sequences, offset)
        offset += 8 * num_sequences
        self._doc_indices = np.frombuffer(idx, np.int64, num_doc_indices, offset)
        offset += 8 * num_doc_indices
        self._modes = np.frombuffer(idx, np.int8, num_sequences, offset) if self.multimodal else None
        if num_doc_indices < 1 or self._doc_indices[0] != 0 or self._doc_indices[-1] != num_sequences:
            found = self._doc_indices[[0, -1]].tolist() if num_doc_indices else "an empty array"
            raise IndexedDatasetError(
                f"{idx_path}: document_indices must start at 0 and end at sequence_count ({num_sequences}), "
                f"found first/last {found}"
            )

        self._bin_map, self._bin = _map(bin_path)
        if check_entries:
            self._check_sequences(idx_path)
        itemsize = self.dtype.itemsize
        expected_bin = int(self._pointers[-1]) + int(self._lengths[-1]) * itemsize if num_sequences else 0
        if len(self._bin) != expected_bin:
            raise IndexedDatasetError(
                f"{bin_path}: size disagrees with {idx_path}: expected {expected_bin} bytes "
                f"({num_sequences} sequences of {self.dtype.name}), found {len(self._bin)} bytes"
                f"{self._first_past_end(len(self._bin))}"
            )
        if check_entries:
            self._check_documents(idx_path)

    def _check_sequences(self, idx_path: str) -> None:
        """Lengths are non-negative and each sequence starts where the previous one ends, the first at byte 0.

        Together with the `.bin` size check this puts every sequence inside the `.bin`, without overlaps.
        """
        lengths, pointers, itemsize = self._lengths, self._pointers, self.dtype.itemsize
        n = len(lengths)
        if n and pointers[0] != 0:
            raise IndexedDatasetError(f"{idx_path}: sequence 0 starts at byte {int(pointers[0])}, expected 0")
        ends = np.empty(min(n, _CHECK_CHUNK), np.int64)
        for start in range(0, n, _CHECK_CHUNK):
            stop = min(start + _CHECK_CHUNK, n)
            chunk = lengths[start:stop]
            if chunk.min() < 0:
                i = start + int(np.flatnonzero(chunk < 0)[0])
                raise IndexedDatasetError(f"{idx_path}: sequence {i} has a negative length ({int(lengths[i])})")
            end = ends[: stop - start]
            np.multiply(chunk, itemsize, out=end, dtype=np.int64)
            np.add(end, pointers[start:stop], out=end)
            following = pointers[start + 1 : stop + 1]  # one shorter than `end` in the last chunk
            if not np.array_equal(end[: len(following)], following):
                i = start + int(np.flatnonzero(end[: len(following)] != following)[0])
                expected = int(end[i - start])
                raise IndexedDatasetError(
                    f"{idx_path}: sequence {i + 1} starts at byte {int(pointers[i + 1])}, expected {expected} "
                    f"(sequence {i} starts at byte {int(pointers[i])} and holds {int(lengths[i])} tokens of "
                    f"{itemsize} bytes)"
                )

    def _first_past_end(self, bin_size: int) -> str:
        """Names the first sequence that ends past a `.bin` of `bin_size` bytes ("" when none does)."""
        for start in range(0, len(self._lengths), _CHECK_CHUNK):
            stop = start + _CHECK_CHUNK
            end = self._pointers[start:stop] + self._lengths[start:stop].astype(np.int64) * self.dtype.itemsize
            past = np.flatnonzero(end > bin_size)
            if past.size:
                i = start + int(past[0])
                return (
                    f"; sequence {i} (byte {int(self._pointers[i])}, {int(self._lengths[i])} tokens) is the first "
                    "to run past the end"
                )
        return ""

    def _check_documents(self, idx_path: str) -> None:
        """Document boundaries never decrease (their ends, 0 and N, are checked with the sizes)."""
        bounds = self._doc_indices
        for start in range(0, len(bounds) - 1, _CHECK_CHUNK):
            stop = min(start + _CHECK_CHUNK, len(bounds) - 1)
            drops = bounds[start + 1 : stop + 1] < bounds[start:stop]
            if drops.any():
                k = start + int(np.flatnonzero(drops)[0])
                raise IndexedDatasetError(
                    f"{idx_path}: document_indices must not decrease: entry {k + 1} is {int(bounds[k + 1])}, "
                    f"after {int(bounds[k])}"
                )

    @staticmethod
    def exists(prefix) -> bool:
        """Whether both `prefix.bin` and `prefix.idx` exist."""
        return all(os.path.isfile(p) for p in _paths(prefix))

    # -- pickling by path -----------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "multimodal": self.multimodal}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self.multimodal = state["multimodal"]
        # The pickling process checked these files' entries when it opened them; data-loader workers would
        # otherwise each repeat that pass over the whole index. The header and size checks still run.
        self._open(check_entries=False)

    # -- access ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32[N]: tokens per sequence."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64[N]: byte offset of each sequence in `.bin`."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64[D + 1]: document k is sequences [document_indices[k], document_indices[k + 1])."""
        return self._doc_indices

    @property
    def sequence_modes(self) -> np.ndarray | None:
        """int8[N] per-sequence modes of a multimodal dataset (None otherwise)."""
        return self._modes

    @property
    def num_tokens(self) -> int:
        return int(self._lengths.sum(dtype=np.int64))

    @functools.cached_property
    def content_key(self) -> str:
        """Identifies what the index says about the data: the `.idx` size and a SHA-256 of the sequence lengths and
        document boundaries (what every derived index depends on). Hashes 12 bytes per sequence once per object.
        """
        digest = hashlib.sha256()
        digest.update(memoryview(np.ascontiguousarray(self._lengths)).cast("B"))
        digest.update(memoryview(np.ascontiguousarray(self._doc_indices)).cast("B"))
        return f"{os.path.getsize(_paths(self.prefix)[1])}-{digest.hexdigest()}"

    def _check_index(self, i) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} is out of range for {self.prefix} ({n} sequences)")
        return i

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an IndexedDataset must have step 1, got {step}")
            if stop <= start:
                return []
            lengths = self._lengths[start:stop]
            # One contiguous view over the whole range, then split into sequences.
            block = np.frombuffer(self._bin, self.dtype, int(lengths.sum(dtype=np.int64)), int(self._pointers[start]))
            return np.split(block, np.cumsum(lengths[:-1], dtype=np.int64))
        i = self._check_index(key)
        tokens = np.frombuffer(self._bin, self.dtype, int(self._lengths[i]), int(self._pointers[i]))
        return (tokens, int(self._modes[i])) if self.multimodal else tokens

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        i = self._check_index(i)
        size = int(self._lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {i} of {size} tokens")
        return np.frombuffer(self._bin, self.dtype, length, int(self._pointers[i]) + offset * self.dtype.itemsize)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={len(self._doc_indices) - 1}, "
            f"dtype={self.dtype.name})"
        )


class IndexedDatasetWriter:
    """Writes a Megatron-format dataset; nothing appears under the final names until `finalize()`.

    Usable as a context manager: leaving the block by an exception discards the temporary files.

    Args:
        prefix: output path without extension.
        dtype: token dtype (see `optimal_dtype`).
        multimodal: also store a per-sequence int8 mode.
    """

    def __init__(self, prefix, dtype=np.int32, multimodal: bool = False) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.multimodal = multimodal
        self._bin_path, self._idx_path = _paths(self.prefix)
        Path(self._bin_path).parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp, self._idx_tmp = self._bin_path + suffix, self._idx_path + suffix
        try:
            self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finalize()/discard()
        except OSError as exc:  # name the file the user asked for, not its temporary name
            raise OSError(exc.errno, exc.strerror, self._bin_path) from exc
        self._lengths = array("i")
        self._doc_indices = array("q", [0])
        self._modes = array("b")
        self._done = False

    def _tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if tokens.dtype != self.dtype:
            if tokens.size and tokens.dtype.kind in "iu" and self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                low, high = int(tokens.min()), int(tokens.max())
                if low < info.min or high > info.max:
                    raise ValueError(f"token ids in [{low}, {high}] do not fit the dataset dtype {self.dtype.name}")
            tokens = tokens.astype(self.dtype)
        return tokens

    def _write(self, data) -> None:
        with names_file(self._bin_path):
            self._bin.write(data)

    def add_item(self, tokens, mode: int = 0) -> None:
        """Appends one sequence to the current document (close it with `end_document()`)."""
        tokens = self._tokens(tokens)
        self._write(np.ascontiguousarray(tokens).data)
        self._lengths.append(len(tokens))
        if self.multimodal:
            self._modes.append(mode)

    def end_document(self) -> None:
        """Closes the current document (every sequence added since the previous one)."""
        self._doc_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths=None, modes=None) -> None:
        """Appends one document made of sequences of `lengths` tokens (one sequence of all tokens by default)."""
        tokens = self._tokens(tokens)
        lengths = [len(tokens)] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != len(tokens) or any(n < 0 for n in lengths):
            raise ValueError(f"lengths {lengths} do not partition the document's {len(tokens)} tokens")
        self._write(np.ascontiguousarray(tokens).data)
        self._lengths.extend(lengths)
        if self.multimodal:
            self._modes.extend([0] * len(lengths) if modes is None else list(modes))
        self.end_document()

    def add_documents(self, tokens, sequence_lengths, sequences_per_document=None) -> None:
        """Appends many documents at once from flat arrays (the fast path of preprocessing).

        Args:
            tokens: all tokens, concatenated.
            sequence_lengths: tokens per sequence; they must sum to len(tokens).
            sequences_per_document: sequences of each document (default: one sequence per document).
        """
        tokens = self._tokens(tokens)
        sequence_lengths = np.asarray(sequence_lengths, dtype=np.int64)
        if int(sequence_lengths.sum()) != len(tokens):
            raise ValueError(f"sequence_lengths sum to {int(sequence_lengths.sum())}, not to {len(tokens)} tokens")
        if sequences_per_document is None:
            sequences_per_document = np.ones(len(sequence_lengths), np.int64)
        counts = np.asarray(sequences_per_document, dtype=np.int64)
        if int(counts.sum()) != len(sequence_lengths):
            raise ValueError(f"sequences_per_document sum to {int(counts.sum())}, not {len(sequence_lengths)}")
        self._write(np.ascontiguousarray(tokens).data)
        start = len(self._lengths)
        self._lengths.frombytes(sequence_lengths.astype(np.int32).tobytes())
        if self.multimodal:
            self._modes.frombytes(np.zeros(len(sequence_lengths), np.int8).tobytes())
        self._doc_indices.frombytes((start + np.cumsum(counts)).astype(np.int64).tobytes())

    def add_index(self, other_prefix) -> None:
        """Appends every document of another dataset of the same dtype (merging)."""
        other = IndexedDataset(other_prefix, multimodal=self.multimodal)
        if other.dtype != self.dtype:
            raise ValueError(f"{other_prefix} holds {other.dtype.name} tokens, this writer {self.dtype.name}")
        start = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths).tobytes())
        self._doc_indices.frombytes((other.document_indices[1:] + start).astype(np.int64).tobytes())
        if self.multimodal:
            self._modes.frombytes(np.ascontiguousarray(other.sequence_modes).tobytes())
        chunk = 64 << 20
        view = other._bin
        for begin in range(0, len(view), chunk):
            self._write(view[begin : begin + chunk])
        del view, other

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    def _index_bytes(self) -> list[bytes]:
        lengths = np.frombuffer(self._lengths, np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.frombuffer(self._doc_indices, np.int64)
        header = _HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(doc_indices))
        parts = [header, lengths.tobytes(), pointers.tobytes(), doc_indices.tobytes()]
        if self.multimodal:
            parts.append(bytes(self._modes))
        return parts

    def finalize(self) -> None:
        """Writes the `.idx`, then renames `.bin` and `.idx` into place (the `.idx` last)."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: finalize() was already called")
        try:
            with names_file(self._bin_path):
                self._bin.flush()
                os.fsync(self._bin.fileno())
                self._bin.close()
            with names_file(self._idx_path), open(self._idx_tmp, "wb") as handle:
                for part in self._index_bytes():
                    handle.write(part)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(self._bin_tmp, self._bin_path)
            os.replace(self._idx_tmp, self._idx_path)
        except BaseException:
            self.discard()
            raise
        self._done = True

    def discard(self) -> None:
        """Abandons the dataset: closes and deletes the temporary files (final names are never touched)."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._done:
            self.finalize()
