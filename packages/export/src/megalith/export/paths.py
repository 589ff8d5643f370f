"""Reading input files safely: regular files only, bounded JSON reads, names that stay inside their folder.

Every failure is a ConversionError whose message starts with the file: "<file>: cannot read (Permission denied)".
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from megalith.export.spec import ConversionError

MAX_JSON_BYTES = 64 << 20
"""Largest JSON file read (configs are kilobytes; the safetensors index of a large MoE model a few megabytes)."""


def require_file(path: str | os.PathLike) -> Path:
    """`path`, checked to be a regular file this process can open (a FIFO or device is never opened).

    Raises:
        ConversionError: "<path>: cannot read (<reason>)" for a missing, unreadable or non-regular file.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            reason = os.strerror(errno.EISDIR)
        elif not stat.S_ISREG(mode):
            reason = "not a regular file"
        else:
            with open(path, "rb"):
                return path
    except OSError as exc:
        reason = exc.strerror or str(exc)
    raise ConversionError(f"{path}: cannot read ({reason})")


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> object:
    """The parsed contents of a JSON file of at most `limit` bytes; errors name the file."""
    path = require_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise ConversionError(f"{path}: larger than {limit} bytes, too large for a JSON config or index")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or encoding, over-long integers, deep nesting
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None


def resolve(path: str | os.PathLike) -> Path:
    """`path` with every symlink resolved; a symlink loop is a ConversionError naming the path."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # RuntimeError before Python 3.13, OSError (ELOOP) after
        raise ConversionError(f"{path}: cannot resolve (symlink loop)") from None


def _allowed_roots(folder: Path) -> list[Path]:
    root = resolve(folder)
    # huggingface_hub's cache keeps <repo>/snapshots/<revision>/<file> as links to <repo>/blobs/<hash>; a snapshot
    # is the folder users point at, so links into its own repository's blobs count as inside.
    if root.parent.name == "snapshots":
        return [root, root.parent.parent / "blobs"]
    return [root]


def file_in_folder(folder: str | os.PathLike, name: str, listed_in: str | os.PathLike | None = None) -> Path:
    """`folder / name`, refusing a name that leads out of `folder` or resolves (through symlinks) outside it.

    Args:
        folder: the input folder.
        name: a relative file name inside it, as read from a file (`listed_in`) or fixed by a format.
        listed_in: the file that named `name` (an index), for the error message.

    Raises:
        ConversionError: naming `listed_in` and the entry (or the file) and where it leads.
    """
    folder = Path(folder)
    where = f"{listed_in}: entry {name!r} " if listed_in is not None else f"{folder / name}: "
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ConversionError(f"{where}leads outside the folder {folder}")
    path = folder / name
    target = resolve(path)
    if not any(target == root or target.is_relative_to(root) for root in _allowed_roots(folder)):
        raise ConversionError(f"{where}resolves to {target}, outside the folder {folder}")
    return path
