"""Checkpoint directory layout: ROOT/iter_{step:07d}/ (data files, index.json, megalith.json) and ROOT/latest.

A checkpoint directory is written under a temporary name (`iter_0000100.tmp`), its `megalith.json` is written
last inside it, then it is renamed to its final name, and only then is `latest` replaced (atomically) with the
new directory's name. A crash at any point leaves the previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from megalith.core.checkpoint.storage import atomic_write_text, check_crc, dumps_checked, fsync_dir, read_json

__all__ = [
    "INFO_FILE",
    "LATEST_FILE",
    "MODEL_PREFIX",
    "OPTIM_PREFIX",
    "atomic_write_text",
    "iter_dir_name",
    "list_checkpoints",
    "publish_checkpoint",
    "read_info",
    "resolve_checkpoint_dir",
    "tmp_dir_name",
]

INFO_FILE = "megalith.json"
LATEST_FILE = "latest"
MODEL_PREFIX = "model/"  # checkpoint key of canonical tensor NAME: "model/NAME"
OPTIM_PREFIX = "optim/"  # checkpoint key of optimizer state KEY of tensor NAME: "optim/NAME/KEY"
FORMAT_VERSION = 2  # 1 was Megalith 0.1's torch.distributed.checkpoint (pickled metadata) layout
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"iter_{step:07d}"


def tmp_dir_name(step: int) -> str:
    return iter_dir_name(step) + ".tmp"


def publish_checkpoint(root: str | os.PathLike, step: int, info: dict[str, Any]) -> Path:
    """Finishes ROOT/iter_STEP.tmp: writes its megalith.json, renames it to iter_STEP, then points `latest` at it.

    Called by one process after every rank's data is written. Returns the final directory.
    """
    root = Path(root)
    tmp, final = root / tmp_dir_name(step), root / iter_dir_name(step)
    info = {"format_version": FORMAT_VERSION, "step": step, **info}
    atomic_write_text(tmp / INFO_FILE, dumps_checked(info))
    if final.exists():  # saving the same step again (e.g. after a resume): the new one wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    return final


def read_info(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The megalith.json of one checkpoint directory (its own CRC32 checked)."""
    path = Path(ckpt_dir) / INFO_FILE
    try:
        info = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_dir} is not a complete Megalith checkpoint (no {INFO_FILE})") from None
    version = info.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is newer than this Megalith reads")
    if version < FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version} is Megalith 0.1's pickle-based (torch.distributed.checkpoint) "
            f"layout, which this version never loads because unpickling can run code; export it to a Hugging "
            f"Face directory with the version that wrote it (megalith-export hf) and import that"
        )
    info = check_crc(path, info)
    if not isinstance(info.get("step"), int) or info["step"] < 0:
        raise ValueError(f"{path}: not a Megalith checkpoint description (no valid 'step')")
    return info


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (final name and a megalith.json), sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and (child / INFO_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """One checkpoint directory from `path`: itself when it is one, else the one ROOT/latest names.

    Without a usable `latest` file (none yet, or it names a directory that is gone), the newest complete
    checkpoint directory is used.
    """
    path = Path(path)
    if (path / INFO_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        if not _ITER_RE.match(name):
            raise ValueError(f"{latest}: expected a directory name like iter_0000100, got {name!r}")
        target = path / name
        if (target / INFO_FILE).is_file():
            return target
        # Only a crash while re-saving the step `latest` names gets here: use the newest complete one.
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    raise FileNotFoundError(f"no complete checkpoint in {path} (no {INFO_FILE} in it or in any iter_* dir)")
