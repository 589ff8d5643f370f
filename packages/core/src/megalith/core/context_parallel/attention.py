"""Context-parallel attention (ring and all-gather), swapped in for each layer's AttentionCore from outside.

- **ring**: this rank's keys and values travel around the cp ring, one hop per step; the next block's transfer
  is posted before the current block is computed, so it overlaps with the compute. Partial outputs merge by the
  online-softmax rule with each block's log-sum-exp. The backward pass sends the keys/values around again and
  with them a float32 dK/dV accumulator, to which every rank adds its share; after a full turn it is home.
- **allgather** (Llama-3 style): keys and values are all-gathered (their gradients reduce-scattered) and each
  rank computes its own queries; autograd differentiates the blocks and their merge.

The attention math of both is Megalith's kernel, on CPU and CUDA alike and whatever `runtime.kernels` says:
`megalith.kernels.ops.attention_with_lse` returns the log-sum-exp, takes the causal offsets of chunks held by
other ranks and packed documents (cu_seqlens); `attention_with_lse_backward` gives one block's share of the merged
attention's gradients. torch's SDPA variants that return the log-sum-exp
(`aten._scaled_dot_product_flash_attention_for_cpu`, `aten._scaled_dot_product_flash_attention` on CUDA, in torch
2.11-2.14) take neither offsets nor documents, so they are not used here. Which blocks exist is `blocks.py`.

Shape legend: B batch, L tokens per rank, N query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from megalith.core.context_parallel.blocks import BlockPlans, block_backward, block_forward, merge_into
from megalith.core.models.packing import Documents
from megalith.core.models.transformer import AttentionCore
from megalith.core.parallel.mappings import gather_from_sequence_parallel_region
from megalith.core.parallel_dims import CP_COMMS

__all__ = ["ContextParallelAttention", "RingComm", "apply_context_parallel"]

_TAG_KV, _TAG_GRAD = 0, 1
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RingComm:
    """Shifts tensors one hop around the cp ring (to the next rank, from the previous), asynchronously.

    `wait_seconds` adds up the time spent waiting for transfers to finish: the part of the ring's communication
    that compute did not hide, plus any lag of the sending rank (`benchmarks/context.py` reads it).
    """

    def __init__(self, group) -> None:
        self.group = group
        self.size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.rank = rank
        self.next = dist.get_global_rank(group, (rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (rank - 1) % self.size)
        self.wait_seconds = 0.0

    def shift(self, tensor: torch.Tensor, tag: int) -> _Transfer:
        """Posts the send of `tensor` to the next rank and the receive of the previous rank's into a new tensor."""
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next, group=self.group, tag=tag),
            dist.P2POp(dist.irecv, received, self.prev, group=self.group, tag=tag),
        ]
        return _Transfer(self, dist.batch_isend_irecv(ops), tensor, received)


class _Transfer:
    """One posted shift; `wait()` returns the received tensor (the sent one is kept alive until then)."""

    def __init__(self, comm: RingComm, works, sent: torch.Tensor, received: torch.Tensor) -> None:
        self.comm, self.works, self.sent, self.received = comm, works, sent, received

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        for work in self.works:
            work.wait()
        self.comm.wait_seconds += time.perf_counter() - start
        self.sent = None
        return self.received


class _RingAttention(torch.autograd.Function):
    """Forward: ring attention over the cp group. Backward: the ring again, dK/dV travelling with the keys."""

    @staticmethod
    def forward(ctx, q_BLND, k_BLKD, v_BLKD, comm: RingComm, blocks):
        kv = torch.stack([k_BLKD, v_BLKD])
        out = lse = None
        for step in range(comm.size):
            transfer = comm.shift(kv, _TAG_KV) if step + 1 < comm.size else None
            block = blocks[(comm.rank - step) % comm.size]
            part_out, part_lse = block_forward(q_BLND, kv[0], kv[1], block)
            if step == 0:  # the own (diagonal) block covers every query row
                out, lse = part_out.float(), part_lse.clone()
            else:
                merge_into(out, lse, block.q_rows, part_out, part_lse)
            if transfer is not None:
                kv = transfer.wait()
        out = out.to(q_BLND.dtype)
        ctx.save_for_backward(q_BLND, k_BLKD, v_BLKD, out, lse)
        ctx.comm, ctx.blocks = comm, blocks
        return out

    @staticmethod
    def backward(ctx, dout_BLND):
        q, k, v, out, lse = ctx.saved_tensors
        comm, blocks = ctx.comm, ctx.blocks
        dout = dout_BLND.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, grads = torch.stack([k, v]), None
        for step in range(comm.size):
            transfer = comm.shift(kv, _TAG_KV) if step + 1 < comm.size else None
            block = blocks[(comm.rank - step) % comm.size]
            gq, gk, gv = block_backward(q, kv[0], kv[1], out, dout, lse, block)
            dq[:, block.q_rows] += gq.float()
            mine = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            mine[0][:, block.k_rows] = gk.float()
            mine[1][:, block.k_rows] = gv.float()
            if grads is not None:  # the accumulator of these keys, from the ranks they visited before
                mine += grads.wait()
            grads = comm.shift(mine, _TAG_GRAD)  # after the last step this reaches the keys' owner
            if transfer is not None:
                kv = transfer.wait()
        dkv = grads.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def _allgather_attention(q_BLND, k_BLKD, v_BLKD, group, blocks, order: torch.Tensor) -> torch.Tensor:
    """All-gather keys/values (backward: reduce-scatter), put them in sequence order, attend per local chunk."""
    kv = gather_from_sequence_parallel_region(torch.stack([k_BLKD, v_BLKD]), group, seq_dim=2)
    kv = kv.index_select(2, order)  # rank order (each rank's two chunks) -> the full sequence's order
    outs = []
    for chunk_blocks in blocks:
        parts = [block_forward(q_BLND, kv[0], kv[1], block) for block in chunk_blocks]
        if len(parts) == 1:
            outs.append(parts[0][0])
            continue
        lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
        merged = sum(p[0].float() * torch.exp(p[1] - lse).transpose(1, 2).unsqueeze(-1) for p in parts)
        outs.append(merged.to(q_BLND.dtype))
    return torch.cat(outs, dim=1)


class ContextParallelAttention(AttentionCore):
    """An AttentionCore whose queries, keys and values are this rank's L tokens of sequences split over cp.

    Created by `apply_context_parallel`; keeps the replaced core's dropout setting (which must stay 0: the
    kernel has no attention dropout) and RNG, so recomputation and `apply_dropout` treat it as any core.
    """

    def __init__(self, core: AttentionCore, dims, comm: str, plans: BlockPlans) -> None:
        super().__init__(core.rng)
        self.ops, self.dropout_p = core.ops, core.dropout_p
        self.cp, self.comm_name, self.plans = dims.cp, comm, plans
        self.group = dims.cp_group
        self.ring = RingComm(self.group) if comm == "ring" else None

    def forward(self, q_BLND, k_BLKD, v_BLKD, mask_B1ST=None, documents: Documents | None = None):
        if mask_B1ST is not None:
            raise ValueError("context-parallel attention does not decode with a KV cache; generate with cp=1")
        if self.training and self.dropout_p > 0:
            raise ValueError(
                f"attention dropout ({self.dropout_p}) is not available under context parallelism (cp={self.cp}); "
                "set runtime.attention_dropout=0"
            )
        if q_BLND.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"context-parallel attention runs in float32, bfloat16 or float16, got {q_BLND.dtype}")
        b, local_len = q_BLND.shape[:2]
        if self.comm_name == "ring":
            blocks = self.plans.get("ring", b, local_len, documents)
            return _RingAttention.apply(q_BLND, k_BLKD, v_BLKD, self.ring, blocks)
        blocks = self.plans.get("allgather", b, local_len, documents)
        order = _gather_order(self.cp, local_len, q_BLND.device)
        return _allgather_attention(q_BLND, k_BLKD, v_BLKD, self.group, blocks, order)


def _gather_order(cp: int, local_len: int, device) -> torch.Tensor:
    """Index into the all-gathered sequence (rank 0's chunks 0 and 2cp-1, rank 1's 1 and 2cp-2, ...) that puts it
    in sequence order."""
    chunk = local_len // 2
    slot = {}
    for rank in range(cp):
        slot[rank], slot[2 * cp - 1 - rank] = 2 * rank, 2 * rank + 1
    return torch.cat([torch.arange(slot[c] * chunk, (slot[c] + 1) * chunk, device=device) for c in range(2 * cp)])


def apply_context_parallel(model: nn.Module, dims, *, comm: str = "ring") -> nn.Module:
    """Swaps every layer's attention core for the context-parallel one of `comm` ("ring" or "allgather").

    Everything else in the model is local to the rank's tokens; the rank's token positions and the documents
    reach the attention through the model's `position_ids` and `cu_seqlens` inputs (`shard_microbatch` cuts a
    micro-batch). Does nothing when cp == 1. Returns the model.
    """
    if comm not in CP_COMMS:
        raise ValueError(f"cp_comm must be one of {', '.join(CP_COMMS)}, got {comm!r}")
    if dims.cp == 1:
        return model
    plans = BlockPlans(dims.cp, dims.cp_rank)  # shared by the layers: the blocks are the same in each
    for layer in model.layers.values():
        layer.attn.core = ContextParallelAttention(layer.attn.core, dims, comm, plans)
    return model
