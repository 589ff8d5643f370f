"""Data parallelism: our DDP (bucketed, overlapped reduction), AdamW with ZeRO-1 sharding, FSDP2 mode."""

from megalith.core.distributed.ddp import DDPConfig, DistributedDataParallel
from megalith.core.distributed.fsdp import apply_fsdp2, finalize_fsdp2_grads
from megalith.core.distributed.optimizer import AdamW, OptimizerConfig, StepResult

__all__ = [
    "AdamW",
    "DDPConfig",
    "DistributedDataParallel",
    "OptimizerConfig",
    "StepResult",
    "apply_fsdp2",
    "finalize_fsdp2_grads",
]
