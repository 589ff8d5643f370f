"""Reading and writing model weights of a Megalith checkpoint one canonical tensor at a time (export/import)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StoragePrefix
from torch.distributed.checkpoint.planner import SavePlan

from megalith.core.checkpoint.layout import (
    MODEL_PREFIX,
    publish_checkpoint,
    read_info,
    resolve_checkpoint_dir,
    tmp_dir_name,
)
from megalith.core.checkpoint.sharded import (
    SafeFileSystemReader,
    _ShardSavePlanner,
    read_full_tensors,
)

__all__ = ["ModelCheckpointReader", "write_model_checkpoint"]

_BATCH_BYTES = 1 << 30  # tensors are gathered into files of about this size while writing


class ModelCheckpointReader:
    """Full canonical model tensors from a checkpoint, read one at a time (whatever layout saved it).

    Args:
        path: a run's checkpoint root (its `latest` is followed) or one `iter_*` directory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_checkpoint_dir(path)
        self.info = read_info(self.path)
        self._metadata = SafeFileSystemReader(self.path).read_metadata()
        self._names = sorted(
            key[len(MODEL_PREFIX) :] for key in self._metadata.state_dict_metadata if key.startswith(MODEL_PREFIX)
        )

    @property
    def step(self) -> int:
        return int(self.info["step"])

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The model configuration in `ModelConfig.to_dict()` form (None when the checkpoint has none)."""
        return self.info.get("model_config")

    @property
    def tokenizer_dir(self) -> Path | None:
        tok = self.path / "tokenizer"
        return tok if tok.is_dir() else None

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._md(name).size)

    def read(self, name: str) -> torch.Tensor:
        """The full canonical tensor `name` (on CPU, in the dtype it was saved in)."""
        self._md(name)
        return read_full_tensors(self.path, [MODEL_PREFIX + name], self._metadata)[MODEL_PREFIX + name]

    def _md(self, name: str):
        md = self._metadata.state_dict_metadata.get(MODEL_PREFIX + name)
        if md is None:
            raise KeyError(f"{self.path}: no model tensor {name!r} (has {len(self._names)} tensors)")
        return md


def write_model_checkpoint(
    out_dir: str | os.PathLike,
    model_config_dict: dict[str, Any] | None,
    named_tensors_iter: Iterable[tuple[str, torch.Tensor]],
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Writes full canonical tensors as a model-only checkpoint (step 0) under root `out_dir`.

    Training loads it at any (tp, pp, dp) layout. Tensors are consumed from the iterator and written in
    batches of about 1 GiB, so at most one batch is in memory. Returns the checkpoint directory.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_dir_name(0)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
    writer.set_up_storage_writer(True)
    items, results, batch, batch_bytes, seen = [], [], {}, 0, set()

    def flush(index: int) -> None:
        planner = _ShardSavePlanner(batch)
        planner.set_up_planner({}, None, True)
        plan = planner.create_local_plan()
        plan = dataclasses.replace(plan, storage_data=_StoragePrefix(f"__0_{index}_"))
        items.extend(plan.items)
        results.append(writer.write_data(plan, planner).wait())

    num_batches = 0
    for name, tensor in named_tensors_iter:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        batch[MODEL_PREFIX + name] = tensor.detach().to("cpu")
        batch_bytes += tensor.numel() * tensor.element_size()
        if batch_bytes >= _BATCH_BYTES:
            flush(num_batches)
            num_batches, batch, batch_bytes = num_batches + 1, {}, 0
    if batch or num_batches == 0:
        flush(num_batches)
    _, metadata = create_default_global_save_plan([SavePlan(items)])
    writer.finish(metadata, results)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    return publish_checkpoint(
        root, 0, {"model_config": model_config_dict, "world_size": 1, "extra": {}, "has_optimizer": False}
    )
