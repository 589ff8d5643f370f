"""On-disk cache of dataset indices: atomic `.npy` writes, and one builder at a time across processes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["IndexCache", "description_hash", "make_shareable"]


def make_shareable(path) -> None:
    """Gives a mkstemp file (created 0600) the permissions an ordinary open() would, honouring the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def description_hash(description: dict) -> str:
    """Hex MD5 of the pretty-printed JSON (indent=4) of a description, as Megatron-LM names its caches."""
    return hashlib.md5(json.dumps(description, indent=4).encode("utf-8")).hexdigest()


class IndexCache:
    """The files `{dir}/{md5}-{kind}-{split}-{name}.npy` plus `...-description.txt` of one index.

    `load_or_build(build)` returns the arrays, building them (and writing them atomically) only if some file is
    missing; concurrent callers (ranks starting together) serialise on an flock, so one builds and the others
    wait and then load.
    """

    def __init__(self, directory, kind: str, split: str, description: dict, names: tuple[str, ...]) -> None:
        self.directory = Path(directory)
        self.description = description
        self.base = f"{description_hash(description)}-{kind}-{split}"
        self.names = names
        self.built = False  # whether the last load_or_build built the arrays in this process

    def path(self, name: str) -> Path:
        return self.directory / f"{self.base}-{name}.npy"

    @property
    def description_path(self) -> Path:
        return self.directory / f"{self.base}-description.txt"

    def complete(self) -> bool:
        return self.description_path.is_file() and all(self.path(n).is_file() for n in self.names)

    def _load(self) -> dict[str, np.ndarray]:
        return {name: np.load(self.path(name), mmap_mode="r", allow_pickle=False) for name in self.names}

    def load_or_build(self, build) -> dict[str, np.ndarray]:
        self.built = False
        if self.complete():
            return self._load()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self.directory / f"{self.base}.lock", "a+")  # noqa: SIM115 - closed below
        except OSError:
            # A read-only data directory: build in memory every time rather than fail.
            self.built = True
            return build()
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                if self.complete():
                    return self._load()
                arrays = build()
                for name in self.names:
                    _save_atomic(self.path(name), arrays[name])
                _write_text_atomic(self.description_path, json.dumps(self.description, indent=4))
                self.built = True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return self._load()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        make_shareable(tmp)
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.asarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        make_shareable(tmp)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
