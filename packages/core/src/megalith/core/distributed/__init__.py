"""Data parallelism: our DDP (bucketed, overlapped reduction), AdamW with ZeRO-1 sharding, FSDP2 mode."""

from megalith.core.distributed.comm import Comms, GroupComm, NcclGroupComm, TorchGroupComm, build_comms
from megalith.core.distributed.ddp import DDPConfig, DistributedDataParallel
from megalith.core.distributed.fsdp import apply_fsdp2, finalize_fsdp2_grads
from megalith.core.distributed.optimizer import AdamW, OptimizerConfig, StepResult

__all__ = [
    "AdamW",
    "Comms",
    "DDPConfig",
    "DistributedDataParallel",
    "GroupComm",
    "NcclGroupComm",
    "OptimizerConfig",
    "StepResult",
    "TorchGroupComm",
    "apply_fsdp2",
    "build_comms",
    "finalize_fsdp2_grads",
]
