"""Where canonical tensors come from and go to, atomic output directories, tokenizer files and progress output.

A *source* is anything with `model_config` (a dict in `ModelConfig.to_dict()` form), `tensor_names()`,
`read(name)` returning one full canonical tensor, and `tokenizer_dir` (a path or None):
`megalith.core.checkpoint.ModelCheckpointReader` is one, `CanonicalDirSource` (a directory holding a canonical
`model.safetensors` plus `megalith.json`) is another. A *sink* is a callable
`sink(out_dir, model_config, named_tensors_iter, tokenizer_dir=None)`:
`megalith.core.checkpoint.write_model_checkpoint` is one, `write_canonical_dir` is another.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from megalith.export.paths import file_in_folder, read_json, require_file, resolve
from megalith.export.safetensors_io import SafetensorsReader, SafetensorsWriter
from megalith.export.spec import ConversionError, model_config_from_dict

CANONICAL_WEIGHTS = "model.safetensors"
CANONICAL_CONFIG = "megalith.json"
# Files a Hugging Face tokenizer (and its generation defaults) may consist of; copied in both directions.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "generation_config.json",
)


@runtime_checkable
class ModelSource(Protocol):
    """One model's canonical tensors, read one at a time (CONTRACT: ModelCheckpointReader)."""

    @property
    def model_config(self) -> dict: ...

    @property
    def tokenizer_dir(self) -> str | os.PathLike | None: ...

    def tensor_names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


Sink = Callable[..., object]

ROW_BLOCK_BYTES = 16 << 20
"""Vocabulary-sized tensors (embedding, output) are streamed in row blocks of about this many bytes when the
source can read row ranges (`read(name, rows=slice)` and `shape(name)`), so they never sit whole in memory."""


def reads_rows(source: ModelSource) -> bool:
    """Whether `source.read` takes `rows=` (ModelCheckpointReader, CanonicalDirSource) and it has `shape`."""
    try:
        params = inspect.signature(source.read).parameters
    except (TypeError, ValueError):
        return False
    return "rows" in params and callable(getattr(source, "shape", None))


def row_blocks(num_rows: int, row_bytes: int, block_bytes: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) row ranges of about `block_bytes` (default ROW_BLOCK_BYTES) each, covering 0 .. num_rows."""
    step = max(1, (ROW_BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, row_bytes))
    return [(a, min(num_rows, a + step)) for a in range(0, num_rows, step)]


# What a source raises for data it cannot read: ModelCheckpointReader's CheckpointCorruptError is a ValueError,
# a file it cannot open an OSError.
SOURCE_READ_ERRORS = (OSError, ValueError)


def describe(exc: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters (a source's message may run on)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _config_from_json(doc: dict, path: Path) -> dict:
    for key in ("model_config", "model"):
        if isinstance(doc.get(key), dict):
            return doc[key]
    if "family" in doc:
        return doc
    raise ConversionError(f"{path}: holds no model config (expected a 'model_config' object)")


class CanonicalDirSource:
    """A directory with a canonical `model.safetensors` and `megalith.json` (+ optional `tokenizer/`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_path = file_in_folder(self.path, CANONICAL_CONFIG)
        doc = read_json(config_path)
        self._config = _config_from_json(doc, config_path)
        try:
            model_config_from_dict(self._config)
        except ConversionError as exc:
            raise ConversionError(f"{config_path}: {exc}") from None
        self._reader = SafetensorsReader(file_in_folder(self.path, CANONICAL_WEIGHTS))
        tokenizer = self.path / "tokenizer"
        # Its files are checked against the tokenizer folder when copied; the folder itself must be ours.
        self._tokenizer = file_in_folder(self.path, "tokenizer") if tokenizer.is_dir() else None

    @staticmethod
    def looks_like(path: str | os.PathLike) -> bool:
        path = Path(path)
        # exists(), not is_file(): a damaged file (a directory, unreadable) is reported when read, by name.
        return (path / CANONICAL_WEIGHTS).exists() and (path / CANONICAL_CONFIG).exists()

    @property
    def model_config(self) -> dict:
        return dict(self._config)

    @property
    def tokenizer_dir(self) -> Path | None:
        return self._tokenizer

    def tensor_names(self) -> list[str]:
        return self._reader.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self._reader.read(name, rows=rows)


def open_source(path: str | os.PathLike, *, verify: str = "checksum") -> ModelSource:
    """A canonical directory directly; anything else through megalith.core.checkpoint.ModelCheckpointReader
    (`verify`: check each checkpoint file's size and CRC32, or its size only)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"--load {path}: no such file or directory")
    if CanonicalDirSource.looks_like(path):
        return CanonicalDirSource(path)
    try:
        from megalith.core.checkpoint import ModelCheckpointReader
    except ImportError as exc:
        raise ConversionError(
            f"--load {path}: not a canonical directory ({CANONICAL_WEIGHTS} + {CANONICAL_CONFIG}), and "
            f"megalith.core.checkpoint.ModelCheckpointReader is unavailable to read a training checkpoint ({exc})"
        ) from exc
    try:
        return ModelCheckpointReader(str(path), verify=verify)
    except ConversionError:
        raise
    except SOURCE_READ_ERRORS as exc:
        raise ConversionError(f"--load {path}: {describe(exc)}") from None


def checkpoint_sink() -> Sink:
    try:
        from megalith.core.checkpoint import write_model_checkpoint
    except ImportError as exc:
        raise ConversionError(
            f"megalith.core.checkpoint.write_model_checkpoint is unavailable ({exc}); use --format canonical"
        ) from exc
    return write_model_checkpoint


def write_canonical_dir(out_dir, model_config: dict, named_tensors: Iterable[tuple[str, torch.Tensor]],
                        tokenizer_dir=None) -> None:  # fmt: skip
    """The canonical-directory sink. The tensors must come in `mapping.entries` order with their dtypes fixed in
    advance, which is what `megalith.export.hf.import_hf` yields (the manifest is derived from the config)."""
    from megalith.export.mapping import canonical_shape, entries

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = model_config_from_dict(model_config)
    iterator = iter(named_tensors)
    first = next(iterator, None)
    if first is None:
        raise ConversionError("no tensors to write")
    dtype = first[1].dtype
    manifest = [(e.canonical, dtype, canonical_shape(e, spec)) for e in entries(spec)]
    writer = SafetensorsWriter(out_dir / CANONICAL_WEIGHTS, manifest, {"format": "pt"})
    try:
        writer.write(*first)
        for name, tensor in iterator:
            writer.write(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (out_dir / CANONICAL_CONFIG).write_text(json.dumps({"model_config": model_config}, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir / "tokenizer")


def copy_tokenizer_files(src, dst, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copies the known tokenizer files present in `src` into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).exists() and n not in skip]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        # A link out of the folder would copy an unrelated file (a credential, say) into the output.
        path = require_file(file_in_folder(src, name))
        try:
            with open(path, "rb") as fin, open(dst / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except OSError as exc:
            raise ConversionError(f"{src / name}: cannot copy to {dst / name} ({exc.strerror or exc})") from None
    return names


def source_paths(source: ModelSource) -> list[Path]:
    """The folders a source reads from (its own path where it has one, and its tokenizer folder)."""
    paths = [getattr(source, "path", None), source.tokenizer_dir]
    return [Path(p) for p in paths if p is not None]


def check_output_apart(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuses an output that is, contains or lies inside one of `inputs` (after resolving symlinks).

    Replacing such an output would delete (part of) the input it is made from, so `force` does not override this.
    """
    out = Path(out)
    target = resolve(out)
    for src in inputs:
        if src is None:
            continue
        resolved = resolve(src)
        if target == resolved:
            relation = "is"
        elif resolved.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(resolved):
            relation = "lies inside"
        else:
            continue
        raise ConversionError(
            f"output {out} {relation} the input {src}; choose another output directory (--force does not override this)"
        )


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `out`; on success it replaces `out`, on failure it is removed.

    An existing `out` is refused unless `force`; with `force` it is replaced only after the new one is complete.
    An `out` that is, contains or lies inside one of `inputs` is always refused (see `check_output_apart`).
    """
    out = Path(out)
    check_output_apart(out, inputs)
    if out.exists() and not force:
        raise ConversionError(f"output {out} already exists (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
        raise ConversionError(f"output {out}: cannot create {exc.filename or out.parent} ({reason})") from None
    tmp = _fresh_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not tmp.is_dir():
        raise ConversionError(f"{tmp}: the output was not written")
    holder = None
    if out.exists() or out.is_symlink():
        # Moved aside whole (a symlink as the link itself, its target untouched), deleted once the new one is in.
        holder = _fresh_dir(out.parent, f".{out.name}.old-")
        out.rename(holder / out.name)
    tmp.rename(out)
    if holder is not None:
        shutil.rmtree(holder)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A directory `parent / (prefix + random)` created new: a leftover or planted one of that name is never used."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConversionError(f"{parent}: cannot create a working directory ({exc.strerror})") from None
    raise ConversionError(f"{parent}: cannot create a working directory {prefix}* (every name tried exists)")


class Progress:
    """One progress bar per tensor group (embeddings, each layer, head) on stderr."""

    def __init__(self, total_groups: int, enabled: bool = True, stream=None):
        self.total_groups = total_groups
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._group = None
        self._done_groups = 0
        self._bytes = 0
        self._start = time.perf_counter()

    def tensor(self, group: str, name: str, nbytes: int) -> None:
        if group != self._group:
            self._finish_group()
            self._group, self._count = group, 0
        self._count += 1
        self._bytes += nbytes
        if self.enabled and self.stream.isatty():
            self._draw(name)

    def close(self) -> None:
        self._finish_group()

    def _draw(self, name: str, end: str = "") -> None:
        width = 24
        filled = int(width * self._done_groups / max(self.total_groups, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self._done_groups}/{self.total_groups} {self._group}: {name}"
        # On a terminal the bar redraws in place; elsewhere (logs) each finished group is one plain line.
        self.stream.write(f"\r{line}\x1b[K{end}" if self.stream.isatty() else f"{line}{end}")
        self.stream.flush()

    def _finish_group(self) -> None:
        if self._group is None:
            return
        self._done_groups += 1
        if self.enabled:
            rate = self._bytes / max(time.perf_counter() - self._start, 1e-9) / 1e6
            self._draw(f"{self._count} tensors ({rate:.0f} MB/s)", end="\n")
        self._group = None
