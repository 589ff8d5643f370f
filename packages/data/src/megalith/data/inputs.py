"""Reading raw text inputs: jsonl, jsonl.gz and plain text files, in bounded chunks and in input order."""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from megalith.data.errors import names_file

__all__ = ["Chunk", "InputError", "expand_inputs", "is_jsonl", "iter_chunks", "iter_texts", "parse_json_line"]


class InputError(ValueError):
    """An input file cannot be read as what its name says (a truncated or fake `.gz`); names the file."""


def expand_inputs(patterns) -> list[str]:
    """Expands files and globs (each glob sorted), keeping the order given; a pattern that matches nothing fails."""
    files: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches or not os.path.exists(matches[0]):
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        files.extend(matches)
    return files


def is_jsonl(path: str) -> bool:
    """jsonl / json / their .gz hold one JSON object per line; anything else is plain text (one document)."""
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json", ".ndjson"))


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turns the ways a read fails (a damaged gzip stream, an I/O error) into errors that name the file."""
    try:
        with names_file(path):
            yield
    except gzip.BadGzipFile as exc:
        raise InputError(f"{path}: not a gzip file ({exc})") from None
    except EOFError:
        raise InputError(f"{path}: truncated gzip file (it ends before the end-of-stream marker)") from None
    except zlib.error as exc:
        raise InputError(f"{path}: corrupt gzip data ({exc})") from None


@dataclass
class Chunk:
    """A run of consecutive input lines (jsonl) or one whole text file, numbered in input order."""

    seq: int
    path: str
    first_line: int  # 1-based line number of the first line (1 for text files)
    jsonl: bool
    payload: bytes
    offset: int = 0  # where the payload starts in the (decompressed) file


def iter_chunks(files: list[str], chunk_bytes: int = 1 << 18) -> Iterator[Chunk]:
    """Yields runs of whole lines of about `chunk_bytes` (more when one line is longer); memory stays bounded.

    Reads blocks, not lines, so the cost per byte is a copy and a newline count whatever the line lengths.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    seq = 0
    for path in files:
        with _reading(path):
            handle = _open(path)
        with handle:
            if not is_jsonl(path):
                with _reading(path):
                    payload = handle.read()
                yield Chunk(seq, path, 1, False, payload)
                seq += 1
                continue
            line, position = 1, 0
            carry: list[bytes] = []  # the unfinished last line, in pieces (a very long line stays linear)
            while True:
                with _reading(path):
                    block = handle.read1(chunk_bytes)  # one system call: signals are seen between reads
                if not block:
                    break
                cut = block.rfind(b"\n") + 1
                if cut == 0:
                    carry.append(block)
                    continue
                payload = b"".join([*carry, block[:cut]]) if carry else block[:cut]
                carry = [block[cut:]] if cut < len(block) else []
                yield Chunk(seq, path, line, True, payload, position)
                seq += 1
                line += payload.count(b"\n")
                position += len(payload)
            if carry:
                yield Chunk(seq, path, line, True, b"".join(carry), position)
                seq += 1


def parse_json_line(line: bytes, keys) -> dict:
    """Parses one jsonl line and returns {key: str or list[str]}; raises ValueError with the reason."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    out = {}
    for key in keys:
        if key not in record:
            raise ValueError(f"missing key {key!r}")
        value = record[key]
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"key {key!r} holds a list that is not all strings")
        elif not isinstance(value, str):
            raise ValueError(f"key {key!r} holds {type(value).__name__}, not a string")
        out[key] = value
    return out


def iter_texts(files: list[str], keys) -> Iterator[str]:
    """Every text of every input, streamed (used to train tokenizers); bad jsonl lines fail with file:line."""
    for chunk in iter_chunks(files):
        if not chunk.jsonl:
            yield chunk.payload.decode("utf-8", errors="replace")
            continue
        for offset, line in enumerate(chunk.payload.split(b"\n")):
            if not line.strip():
                continue
            try:
                record = parse_json_line(line, keys)
            except ValueError as exc:
                raise ValueError(f"{chunk.path}:{chunk.first_line + offset}: {exc}") from None
            for value in record.values():
                yield from (value if isinstance(value, list) else [value])
