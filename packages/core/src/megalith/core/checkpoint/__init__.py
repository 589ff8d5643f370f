"""Sharded checkpoint state of megalith.core (the checkpoint engine builds on ShardSpec)."""

from megalith.core.checkpoint.spec import ShardSpec

__all__ = ["ShardSpec"]
