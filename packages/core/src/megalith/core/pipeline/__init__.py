"""Pipeline parallelism: stage construction, point-to-point transfers and the 1F1B / interleaved schedules."""

from megalith.core.pipeline.p2p import PipeComm
from megalith.core.pipeline.schedules import (
    Action,
    allreduce_sequence_parallel_grads,
    finalize_grads,
    forward_backward,
    microbatch_loss,
    schedule_order,
)
from megalith.core.pipeline.stages import (
    allreduce_shared_embedding_grads,
    keep_stage,
    mark_shared_embedding,
    shared_embedding_param,
    split_layers,
    sync_shared_embedding_weights,
    unwrap,
)

__all__ = [
    "Action",
    "PipeComm",
    "allreduce_sequence_parallel_grads",
    "allreduce_shared_embedding_grads",
    "finalize_grads",
    "forward_backward",
    "keep_stage",
    "mark_shared_embedding",
    "microbatch_loss",
    "schedule_order",
    "shared_embedding_param",
    "split_layers",
    "sync_shared_embedding_weights",
    "unwrap",
]
