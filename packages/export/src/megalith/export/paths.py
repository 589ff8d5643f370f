"""Checks on the files conversion reads and writes: files named by an input folder stay inside it."""

from __future__ import annotations

import os
from pathlib import Path

from megalith.export.spec import ConversionError


def _allowed_roots(folder: Path) -> list[Path]:
    root = folder.resolve()
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
    target = path.resolve()
    if not any(target == root or target.is_relative_to(root) for root in _allowed_roots(folder)):
        raise ConversionError(f"{where}resolves to {target}, outside the folder {folder}")
    return path
