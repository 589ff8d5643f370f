"""Sharded, reshardable checkpoints: canonical names and global shapes, safetensors files and a JSON index."""

from __future__ import annotations

from megalith.core.checkpoint.layout import (
    INFO_FILE,
    LATEST_FILE,
    MODEL_PREFIX,
    OPTIM_PREFIX,
    atomic_write_text,
    iter_dir_name,
    list_checkpoints,
    publish_checkpoint,
    read_info,
    resolve_checkpoint_dir,
    tmp_dir_name,
)
from megalith.core.checkpoint.model_io import ModelCheckpointReader, write_model_checkpoint
from megalith.core.checkpoint.sharded import (
    VERIFY_CHOICES,
    LocalShard,
    TensorInfo,
    load_sharded_state,
    read_full_tensors,
    read_tensor_metadata,
    save_sharded_state,
)
from megalith.core.checkpoint.state import model_sharded_state, optimizer_sharded_state, prepare_optimizer_state
from megalith.core.checkpoint.storage import CheckpointCorruptError
from megalith.core.placement import ShardSpec

__all__ = [
    "INFO_FILE",
    "LATEST_FILE",
    "MODEL_PREFIX",
    "OPTIM_PREFIX",
    "VERIFY_CHOICES",
    "CheckpointCorruptError",
    "LocalShard",
    "ModelCheckpointReader",
    "ShardSpec",
    "TensorInfo",
    "atomic_write_text",
    "iter_dir_name",
    "list_checkpoints",
    "load_sharded_state",
    "model_sharded_state",
    "optimizer_sharded_state",
    "prepare_optimizer_state",
    "publish_checkpoint",
    "read_full_tensors",
    "read_info",
    "read_tensor_metadata",
    "resolve_checkpoint_dir",
    "save_sharded_state",
    "tmp_dir_name",
    "write_model_checkpoint",
]
