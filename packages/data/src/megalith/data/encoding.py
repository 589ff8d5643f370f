"""One chunk of preprocessing input to token arrays: parse the lines, encode the texts, pack the ids.

`ChunkEncoder` runs three steps (`prepare`, `encode`, `finish`) that `megalith.data.preprocess` schedules on
threads or processes. Memory per chunk stays bounded even for one huge document: a tokenizer that can
(`Tokenizer.encodes_in_pieces`) encodes it in parts of about `piece_chars` characters, cut where the ids cannot
change, keeping only the id arrays of each part; text that must reach the encoder whole is limited to
`max_document_bytes`, and a longer document is a bad line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from megalith.data.inputs import Chunk, parse_json_line
from megalith.data.tokenizers import cut_points

__all__ = ["MAX_DOCUMENT_BYTES", "PIECE_CHARS", "ChunkEncoder", "ChunkResult", "pack"]

# The most text one encoder call gets when a tokenizer can encode a long document in parts (characters), and
# the default limit on text it must encode whole (bytes): a byte-level BPE needs about 120 bytes of memory per
# byte of text it encodes at once.
PIECE_CHARS = 1 << 18
MAX_DOCUMENT_BYTES = 8 << 20


@dataclass
class ChunkResult:
    seq: int
    path: str
    documents: int
    input_bytes: int
    bad: list[tuple[int, str]]
    # key -> (tokens, sequence lengths, sequences per document)
    per_key: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class _Prepared:
    chunk: Chunk
    records: list[dict]  # key -> str or list[str], one per good line
    lines: list[int]  # the input line of each record
    bad: list[tuple[int, str]]
    texts: dict[str, list[str]] = field(default_factory=dict)  # key -> every piece of every record, in order
    # key -> the (start, stop) parts of each piece; None when no piece of this chunk is cut
    spans: dict[str, list[list[tuple[int, int]]] | None] = field(default_factory=dict)


class _Parts(list):
    """The id arrays of the consecutive parts of one piece (`pack` joins them)."""


@dataclass
class _Arrays:
    """Encoder output already turned into arrays: per piece, one array or its `_Parts`."""

    ids: list


def _pieces(value) -> list[str]:
    return value if isinstance(value, list) else [value]


class ChunkEncoder:
    """Chunk -> ChunkResult in three steps; `encoder(chunk)` runs all three.

    Args:
        tokenizer: a `megalith.data.tokenizers.Tokenizer`.
        keys: the JSON keys to encode (one output per key).
        append_eod: end every non-empty document with the tokenizer's eod id.
        dtype: the token dtype of the outputs.
        stop_at_bad_line: stop preparing a chunk at its first bad line (the run is going to fail).
        max_document_bytes: most UTF-8 bytes handed to the encoder at once (0 or None: no limit).
        piece_chars: size of the parts a long document is cut into, where the tokenizer allows.
    """

    def __init__(
        self,
        tokenizer,
        keys,
        append_eod: bool,
        dtype,
        stop_at_bad_line: bool,
        max_document_bytes: int | None = MAX_DOCUMENT_BYTES,
        piece_chars: int = PIECE_CHARS,
    ) -> None:
        self.tokenizer = tokenizer
        self.keys = list(keys)
        self.eod = tokenizer.eod if append_eod else None
        self.dtype = np.dtype(dtype)
        self.stop = stop_at_bad_line
        self.max_bytes = max_document_bytes or None
        # Parts small enough that only a stretch without a cut point can exceed the limit (4 bytes per character
        # at most in UTF-8).
        self.piece_chars = piece_chars if self.max_bytes is None else max(1, min(piece_chars, self.max_bytes // 4))

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """The parts of one text the encoder gets: cut where the tokenizer allows (see `cut_points`), else whole."""
        if not self.tokenizer.encodes_in_pieces or len(text) <= self.piece_chars:
            return [(0, len(text))]
        return list(pairwise([0, *cut_points(text, self.piece_chars), len(text)]))

    def _too_long(self, record: dict) -> str | None:
        """Why a record holds more text than may be encoded at once, or None."""
        if self.max_bytes is None:
            return None
        for key in self.keys:
            for piece in _pieces(record[key]):
                if 4 * len(piece) <= self.max_bytes:  # no UTF-8 encoding of it can exceed the limit
                    continue
                size = max(len(piece[a:b].encode("utf-8")) for a, b in self._spans(piece))
                if size > self.max_bytes:
                    how = "a stretch without a cut point of" if self.tokenizer.encodes_in_pieces else "a text of"
                    return (
                        f"key {key!r} holds {how} {size:,} bytes, more than --max-document-bytes "
                        f"{self.max_bytes:,} allows to encode at once"
                    )
        return None

    def prepare(self, chunk: Chunk) -> _Prepared:
        """Splits the lines, parses the JSON, and lists what the encoder gets; bad lines are collected."""
        prepared = _Prepared(chunk, [], [], [])
        if not chunk.jsonl:
            numbered = [(chunk.first_line, dict.fromkeys(self.keys, chunk.payload.decode("utf-8", errors="replace")))]
        else:
            numbered = enumerate(chunk.payload.split(b"\n"), chunk.first_line)
        for number, line in numbered:
            try:
                if isinstance(line, bytes):
                    if not line.strip():
                        continue
                    line = parse_json_line(line, self.keys)
                reason = self._too_long(line)
                if reason is not None:
                    raise ValueError(reason)
            except ValueError as exc:
                prepared.bad.append((number, str(exc)))
                if self.stop:
                    break
                continue
            prepared.records.append(line)
            prepared.lines.append(number)
        self._set_texts(prepared)
        return prepared

    def _set_texts(self, prepared: _Prepared) -> None:
        for key in self.keys:
            pieces = [p for record in prepared.records for p in _pieces(record[key])]
            prepared.texts[key] = pieces
            cut = self.tokenizer.encodes_in_pieces and any(len(p) > self.piece_chars for p in pieces)
            prepared.spans[key] = [self._spans(p) for p in pieces] if cut else None

    def _encode_in_groups(self, pieces: list[str], spans: list[list[tuple[int, int]]]) -> _Arrays:
        """Encodes the parts a few at a time (about `piece_chars` characters per call), keeping only id arrays of
        the output dtype, so the tokenizer's per-token objects for a long document never exist all at once."""
        units = [(k, a, b) for k, piece_spans in enumerate(spans) for a, b in piece_spans]
        arrays: list[np.ndarray] = []
        start = 0
        while start < len(units):
            stop, size = start, 0
            while stop < len(units) and (stop == start or size + units[stop][2] - units[stop][1] <= self.piece_chars):
                size += units[stop][2] - units[stop][1]
                stop += 1
            deferred = self.tokenizer.encode_batch_deferred([pieces[k][a:b] for k, a, b in units[start:stop]])
            arrays.extend(_to_dtype(ids, self.dtype) for ids in self.tokenizer.ids_of(deferred))
            del deferred
            start = stop
        out, position = [], 0
        for piece_spans in spans:
            count = len(piece_spans)
            out.append(arrays[position] if count == 1 else _Parts(arrays[position : position + count]))
            position += count
        return _Arrays(out)

    def encode(self, prepared: _Prepared) -> dict:
        """key -> the tokenizer's deferred result (or `_Arrays`), or the exception it raised on the batch."""
        out: dict = {}
        for key in self.keys:
            texts = prepared.texts[key]
            try:
                if prepared.spans[key] is not None:
                    out[key] = self._encode_in_groups(texts, prepared.spans[key])
                else:
                    out[key] = self.tokenizer.encode_batch_deferred(texts) if texts else []
            except Exception as exc:
                out[key] = exc
        return out

    def finish(self, prepared: _Prepared, encoded: dict) -> ChunkResult:
        """Packs the ids of every key into arrays; a batch the tokenizer failed on is retried record by record."""
        chunk, bad = prepared.chunk, prepared.bad
        if any(isinstance(result, Exception) for result in encoded.values()):
            # The records before a bad JSON line still go through this, so the first bad line is the one reported.
            self._drop_failing(prepared)
            if not (bad and self.stop):
                encoded = self.encode(prepared)
                failed = [result for result in encoded.values() if isinstance(result, Exception)]
                if failed:
                    raise failed[0]
        bad.sort()
        if bad and self.stop:
            return ChunkResult(chunk.seq, chunk.path, 0, len(chunk.payload), bad, {})
        per_key = {}
        for key in self.keys:
            result = encoded[key]
            ids = result.ids if isinstance(result, _Arrays) else self.tokenizer.ids_of(result)
            counts = [len(r[key]) if isinstance(r[key], list) else 1 for r in prepared.records]
            per_key[key] = pack(ids, counts, self.eod, self.dtype)
        return ChunkResult(chunk.seq, chunk.path, len(prepared.records), len(chunk.payload), bad, per_key)

    def _drop_failing(self, prepared: _Prepared) -> None:
        """A batch failed: encodes record by record, moves the records the tokenizer rejects to `bad`."""
        records, lines = [], []
        for record, line in zip(prepared.records, prepared.lines, strict=True):
            for key in self.keys:
                pieces = _pieces(record[key])
                try:
                    self._encode_in_groups(pieces, [self._spans(p) for p in pieces])
                except Exception as exc:
                    prepared.bad.append((line, f"tokenizer failed on key {key!r}: {exc}"))
                    break
            else:
                records.append(record)
                lines.append(line)
                continue
            if self.stop:
                break
        if len(records) == len(prepared.records):
            raise RuntimeError("the tokenizer failed on a batch but on none of its records alone")
        prepared.records, prepared.lines = records, lines
        self._set_texts(prepared)

    def __call__(self, chunk: Chunk) -> ChunkResult:
        prepared = self.prepare(chunk)
        return self.finish(prepared, self.encode(prepared))


def _check_range(tokens: np.ndarray, dtype: np.dtype) -> None:
    if tokens.size and tokens.dtype != dtype:
        low, high = int(tokens.min()), int(tokens.max())
        info = np.iinfo(dtype)
        if low < info.min or high > info.max:
            raise ValueError(f"token ids in [{low}, {high}] do not fit {dtype.name}")


def _to_dtype(ids, dtype: np.dtype) -> np.ndarray:
    tokens = np.array(ids, dtype=np.int64)
    _check_range(tokens, dtype)
    return tokens.astype(dtype)


def pack(ids: list, counts: list[int], eod: int | None, dtype) -> tuple:
    """Flattens the ids of each piece (a list, an array, or `_Parts` of arrays) into (tokens, sequence lengths,
    sequences per document).

    Empty pieces are dropped (a document can end up with no sequence at all, as in Megatron-LM); with `eod`,
    the EOD id is appended to the last sequence of every non-empty document.
    """
    dtype = np.dtype(dtype)
    kept: list = []  # the id runs kept and the EOD markers, in output order
    lengths: list[int] = []
    per_doc: list[int] = []
    position = 0
    end = np.array([0 if eod is None else eod], dtype)
    for count in counts:
        before = len(lengths)
        for piece in ids[position : position + count]:
            size = sum(map(len, piece)) if isinstance(piece, _Parts) else len(piece)
            if size:
                kept.extend(piece) if isinstance(piece, _Parts) else kept.append(piece)
                lengths.append(size)
        position += count
        if eod is not None and len(lengths) > before:
            kept.append(end)
            lengths[-1] += 1
        per_doc.append(len(lengths) - before)
    lengths = np.asarray(lengths, dtype=np.int64)
    if not kept:
        return np.empty(0, dtype), lengths, np.asarray(per_doc, np.int64)
    # Lists become int64; arrays already of `dtype` (a long document's parts) are joined without widening.
    tokens = np.concatenate([piece if isinstance(piece, np.ndarray) else np.array(piece, np.int64) for piece in kept])
    _check_range(tokens, dtype)
    return tokens.astype(dtype, copy=False), lengths, np.asarray(per_doc, np.int64)
