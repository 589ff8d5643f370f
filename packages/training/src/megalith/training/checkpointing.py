"""Checkpoint directories of a run: atomic sharded saves (optionally async), keep-last-N, resume, RNG states.

Layout (see megalith.core.checkpoint.layout): ROOT/iter_{step:07d}/ holds the safetensors files and
`index.json` of the sharded model/optimizer state, `rng/rank_XXXXX.json` per rank and `megalith.json` (step,
model config, world size and the small JSON state the caller passes: scheduler, loss scaler, data position...).
ROOT/latest names the newest complete checkpoint. Nothing is unpickled on load, and every file is checked
against the size and CRC32 the index recorded (`verify="size"` skips the CRC32 for speed).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalith.core.checkpoint import (
    OPTIM_PREFIX,
    LocalShard,
    list_checkpoints,
    load_sharded_state,
    publish_checkpoint,
    read_info,
    read_tensor_metadata,
    resolve_checkpoint_dir,
    save_sharded_state,
    tmp_dir_name,
)
from megalith.core.checkpoint.storage import probe_writable, read_json, storage_error

__all__ = [
    "CheckpointManager",
    "LoadedCheckpoint",
    "capture_rng_state",
    "find_checkpoint",
    "has_optimizer_state",
    "restore_rng_state",
]


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, numpy) as JSON-able data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": _b64(torch.get_rng_state()),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what `capture_rng_state` returned."""
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """What `CheckpointManager.load` restored."""

    path: Path
    step: int
    extra: dict[str, Any]
    model_config: dict[str, Any] | None
    rng_restored: bool
    missing: list[str]


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint directory a resume from `path` would use (root or iter dir), None when there is none."""
    try:
        return resolve_checkpoint_dir(path)
    except FileNotFoundError:
        return None


def has_optimizer_state(ckpt_dir: str | os.PathLike) -> bool:
    return any(name.startswith(OPTIM_PREFIX) for name in read_tensor_metadata(ckpt_dir))


class CheckpointManager:
    """Saves and loads the checkpoints of one run under `root`.

    Constructing it is collective when torch.distributed is initialised (it creates a gloo group of its own,
    so checkpoint collectives, possibly in a background thread, never interleave with training's).

    Args:
        root: the checkpoint root directory.
        keep_last: keep only this many newest checkpoints (None keeps all).
        async_save: `save` copies the state to CPU and writes it in a background thread.
    """

    def __init__(self, root: str | os.PathLike, *, keep_last: int | None = 3, async_save: bool = False) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_save_seconds = 0.0

    # ---- saving ---------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Mapping[str, torch.Tensor | LocalShard],
        *,
        extra: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        save_rng: bool = True,
    ) -> None:
        """Saves checkpoint `step`. Collective; every rank passes its own local shards under the same names.

        `extra` is small JSON-able state saved by rank 0 (scheduler, loss scaler, data position...). With
        async saving this returns once the state is copied to CPU; call `wait()` before relying on the files.
        """
        self.wait()
        info = {
            "model_config": dict(model_config) if model_config is not None else None,
            "extra": dict(extra or {}),
            "world_size": self.world_size,
            "has_optimizer": any(k.startswith(OPTIM_PREFIX) for k in state),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            json.dumps(info, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint extra state / model_config must be JSON-able: {exc}") from None
        rng = capture_rng_state() if save_rng else None
        tmp = self.root / tmp_dir_name(step)
        error = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob("iter_*.tmp"):  # left by a crashed save
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
                if tokenizer_dir is not None:
                    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = storage_error(tmp, exc, "creating the checkpoint directory")
        if self._agree(error):  # also the barrier: every rank sees the directory before writing into it
            raise error or OSError(f"rank 0 could not create {tmp}")
        if not self.async_save:
            start = time.perf_counter()
            self._write(step, tmp, state, rng, info)
            self.last_save_seconds = time.perf_counter() - start
            return
        cpu_state = {name: _to_cpu(name, value) for name, value in state.items()}
        self._error = None
        self._thread = threading.Thread(
            target=self._write_in_background, args=(step, tmp, cpu_state, rng, info), name="megalith-ckpt", daemon=True
        )
        self._thread.start()

    def _write_in_background(self, step, tmp, state, rng, info) -> None:
        try:
            start = time.perf_counter()
            self._write(step, tmp, state, rng, info)
            self.last_save_seconds = time.perf_counter() - start
        except BaseException as exc:  # re-raised by wait() in the training thread
            self._error = exc

    def _write(self, step: int, tmp: Path, state, rng, info) -> None:
        error = None
        try:
            if rng is not None:
                rng_dir = tmp / "rng"
                rng_dir.mkdir(exist_ok=True)
                _write_json(rng_dir / f"rank_{self.rank:05d}.json", rng)
        except OSError as exc:
            error = storage_error(tmp, exc, "writing the RNG state")
        try:
            if self._agree(error):
                raise error or OSError("another rank failed to write its RNG state")
            save_sharded_state(state, tmp, process_group=self.group)
            self._barrier()
            if self.rank == 0:
                publish_checkpoint(self.root, step, info)
                self._prune()
            self._barrier()
        except BaseException:
            if self.rank == 0:  # a failed save leaves nothing behind; the previous checkpoint stays `latest`
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _agree(self, error: BaseException | None) -> bool:
        """Whether any rank saw an error (collective), so every rank stops at the same point."""
        if not self.distributed:
            return error is not None
        flag = torch.tensor([int(error is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def probe(self) -> None:
        """Checks now that the checkpoint root can be created and written, rather than at the first save."""
        error = None
        if self.rank == 0:
            try:
                probe_writable(self.root, "checkpoint.save")
            except OSError as exc:
                error = exc
        if self._agree(error):
            raise error or OSError(f"rank 0 cannot write checkpoints into {self.root}")

    def wait(self) -> None:
        """Blocks until a background save has finished; raises its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"asynchronous checkpoint save failed: {error}") from error

    @property
    def saving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        complete = list_checkpoints(self.root)
        latest = resolve_checkpoint_dir(self.root)
        for _, path in complete[: max(0, len(complete) - self.keep_last)]:
            if path != latest:
                shutil.rmtree(path, ignore_errors=True)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    # ---- loading --------------------------------------------------------------------------------------

    def load(
        self,
        state: Mapping[str, torch.Tensor | LocalShard],
        path: str | os.PathLike | None = None,
        *,
        strict: bool = True,
        load_rng: bool = True,
        verify: str = "checksum",
    ) -> LoadedCheckpoint:
        """Loads checkpoint `path` (a root or iter dir; default this manager's root) into `state` in place.

        Every file is checked first (`verify`: "checksum" = size and CRC32, "size" = size only). RNG states are
        restored only when the world size equals the saving one (else `rng_restored` is False).
        """
        self.wait()
        ckpt = resolve_checkpoint_dir(self.root if path is None else path)
        info = read_info(ckpt)
        missing = load_sharded_state(state, ckpt, process_group=self.group, strict=strict, verify=verify)
        rng_restored = False
        rng_file = ckpt / "rng" / f"rank_{self.rank:05d}.json"
        if load_rng and info.get("world_size") == self.world_size and rng_file.is_file():
            restore_rng_state(read_json(rng_file))
            rng_restored = True
        return LoadedCheckpoint(
            path=ckpt,
            step=int(info["step"]),
            extra=dict(info.get("extra") or {}),
            model_config=info.get("model_config"),
            rng_restored=rng_restored,
            missing=missing,
        )


def _to_cpu(name: str, value: torch.Tensor | LocalShard) -> LocalShard:
    """A CPU copy the training thread may keep modifying the original of."""
    shard = value if isinstance(value, LocalShard) else LocalShard(value)
    copy = shard.tensor.detach().to("cpu", copy=True)
    return LocalShard(copy, shard.spec, flat_range=shard.flat_range, local_shape=shard.local_shape)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
