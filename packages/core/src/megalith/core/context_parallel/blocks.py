"""The attention blocks a cp rank computes: which of its queries meet which keys, within which documents.

Both context-parallel variants split a rank's attention into blocks of (queries, keys) whose partial results
merge by the online-softmax rule. A block is one call of Megalith's kernel
(`megalith.kernels.ops.attention_with_lse`, forward, and `attention_with_lse_backward`): dense, causal with
position offsets, or packed (varlen) when the batch holds documents. For documents a block pairs the queries and
keys of each document that appears on either side: `cu_seqlens_q` and `cu_seqlens_k` list, document by document,
how many of the block's queries and keys belong to it (zero when none), so a document split over chunks and
ranks is attended across them. Only diagonal blocks (the same tokens as queries and keys) are causal; every other
block holds keys that all precede its queries, or it is not computed.

Shape legend: B batch, L tokens per rank, C tokens per chunk (L = 2C), N query heads, K key/value heads,
D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalith.core.context_parallel.layout import rank_chunks, shard_sequence
from megalith.core.models.packing import Documents

__all__ = ["Block", "BlockPlans", "block_backward", "block_forward", "merge_into"]


@dataclass(frozen=True)
class Block:
    """Queries `q_rows` of this rank's tokens against keys `k_rows` (of the key tensor the block is given).

    Without documents `q_offset`/`k_offset` place the rows in the full sequence for the causal mask; with them
    `cu_q`/`cu_k` (int32) pair the rows document by document and each document's rows start at offset 0.
    """

    q_rows: slice
    k_rows: slice
    causal: bool
    q_offset: int = 0
    k_offset: int = 0
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0


def _pair_documents(ids_q: torch.Tensor, ids_k: torch.Tensor) -> dict:
    """cu_q, cu_k, max_q, max_k pairing the documents of two id tensors, each non-decreasing when flattened."""
    flat_q, flat_k = ids_q.reshape(-1).contiguous(), ids_k.reshape(-1).contiguous()
    docs = torch.unique(torch.cat([flat_q, flat_k]))  # sorted: the documents in order, on either side
    bounds = {}
    for name, flat in (("q", flat_q), ("k", flat_k)):
        starts = torch.searchsorted(flat, docs)
        cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
        bounds[f"cu_{name}"], bounds[f"max_{name}"] = cu, int((cu[1:] - cu[:-1]).max())
    return bounds


class BlockPlans:
    """The blocks of each variant for one micro-batch shape and document layout, built once and shared by
    every layer (and the recomputation and backward passes)."""

    def __init__(self, cp: int, cp_rank: int) -> None:
        self.cp, self.cp_rank = cp, cp_rank
        self._key: tuple | None = None
        self._plans: dict[str, list] = {}

    def get(self, variant: str, batch: int, local_len: int, documents: Documents | None) -> list:
        """The blocks of `variant` ("ring": one per source rank; "allgather": a list per local chunk)."""
        key = (batch, local_len, documents)  # a Documents object is made once per model forward
        if key != self._key:
            if documents is not None:
                documents.check_tokens(batch, local_len * self.cp, "context-parallel attention")
            self._key, self._plans = key, {}
        if variant not in self._plans:
            make = self._ring if variant == "ring" else self._allgather
            self._plans[variant] = make(local_len, None if documents is None else documents.ids)
        return self._plans[variant]

    def _ring(self, local_len: int, ids_BS: torch.Tensor | None) -> list[Block]:
        """Block against the keys of each source rank j: own (causal over the rank's two chunks, which are in
        order), an earlier rank (its first chunk precedes both of ours, its second follows both), a later rank
        (both its chunks lie between our two: only our second chunk sees them)."""
        cp, rank, c = self.cp, self.cp_rank, local_len // 2
        blocks = []
        for j in range(cp):
            if j == rank:
                rows, keys, causal = slice(0, local_len), slice(0, local_len), True
            elif j < rank:
                rows, keys, causal = slice(0, local_len), slice(0, c), False
            else:
                rows, keys, causal = slice(c, local_len), slice(0, local_len), False
            docs = {}
            if ids_BS is not None:
                mine, theirs = shard_sequence(ids_BS, cp, rank), shard_sequence(ids_BS, cp, j)
                docs = _pair_documents(mine[:, rows], theirs[:, keys])
            blocks.append(Block(rows, keys, causal, **docs))
        return blocks

    def _allgather(self, local_len: int, ids_BS: torch.Tensor | None) -> list[list[Block]]:
        """For each of our chunks x (rows of this rank) against the gathered keys [0, (x + 1) C): one causal call
        with offsets, or with documents a causal diagonal block plus a block of all earlier keys."""
        c = local_len // 2
        plans = []
        for i, x in enumerate(rank_chunks(self.cp, self.cp_rank)):
            rows, start = slice(i * c, (i + 1) * c), x * c
            if ids_BS is None:
                plans.append([Block(rows, slice(0, start + c), True, q_offset=start)])
                continue
            mine = ids_BS[:, start : start + c]
            blocks = [Block(rows, slice(start, start + c), True, **_pair_documents(mine, mine))]
            if start:
                blocks.append(Block(rows, slice(0, start), False, **_pair_documents(mine, ids_BS[:, :start])))
            plans.append(blocks)
        return plans


def _kernels():
    from megalith.kernels import ops  # imported on use: megalith-core imports without the compiled module

    return ops


def block_forward(q_BLND, k_BTKD, v_BTKD, block: Block):
    """(out [B, Sq, N, D], lse float32 [B, N, Sq]) of one block; differentiable (the all-gather variant's
    autograd runs through it)."""
    ops = _kernels()
    q, k, v = q_BLND[:, block.q_rows], k_BTKD[:, block.k_rows], v_BTKD[:, block.k_rows]
    if block.cu_q is None:
        return ops.attention_with_lse(q, k, v, block.causal, q_offset=block.q_offset, k_offset=block.k_offset)
    b, s, n, d = q.shape
    out, lse = ops.attention_with_lse(
        q.reshape(b * s, n, d), k.flatten(0, 1), v.flatten(0, 1), block.causal, cu_seqlens_q=block.cu_q,
        cu_seqlens_k=block.cu_k, max_seqlen_q=block.max_q, max_seqlen_k=block.max_k,
    )  # fmt: skip
    return out.view(b, s, n, d), lse.view(n, b, s).transpose(0, 1)


def block_backward(q_BLND, k_BTKD, v_BTKD, out_BLND, dout_BLND, lse_BNL, block: Block):
    """This block's share (dq [B, Sq, N, D], dk and dv [B, Sk, K, D]) of the gradients of the merged attention
    whose output and log-sum-exp are `out_BLND` and `lse_BNL` (all of this rank's query rows)."""
    ops = _kernels()
    rows = block.q_rows
    q, k, v = q_BLND[:, rows], k_BTKD[:, block.k_rows], v_BTKD[:, block.k_rows]
    out, dout, lse = out_BLND[:, rows], dout_BLND[:, rows], lse_BNL[:, :, rows]
    if block.cu_q is None:
        return ops.attention_with_lse_backward(
            q, k, v, out, dout, lse.contiguous(), block.causal, q_offset=block.q_offset, k_offset=block.k_offset
        )
    b, s, n, d = q.shape
    dq, dk, dv = ops.attention_with_lse_backward(
        q.reshape(b * s, n, d), k.flatten(0, 1), v.flatten(0, 1), out.reshape(b * s, n, d),
        dout.reshape(b * s, n, d), lse.transpose(0, 1).reshape(n, b * s), block.causal, cu_seqlens_q=block.cu_q,
        cu_seqlens_k=block.cu_k, max_seqlen_q=block.max_q, max_seqlen_k=block.max_k,
    )  # fmt: skip
    return dq.view(b, s, n, d), dk.view(k.shape), dv.view(v.shape)


def merge_into(out_BLND: torch.Tensor, lse_BNL: torch.Tensor, rows: slice, out_BSND, lse_BNS) -> None:
    """Adds a block's result for query `rows` into the float32 accumulators by the online-softmax rule.

    The accumulator's lse must be finite on `rows` (the diagonal block, where every token sees itself, is
    merged first); a block's lse may be -inf (queries that see none of its keys) and then adds nothing.
    """
    old = lse_BNL[:, :, rows]
    new = torch.logaddexp(old, lse_BNS)
    keep = torch.exp(old - new).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(lse_BNS - new).transpose(1, 2).unsqueeze(-1)
    out_BLND[:, rows] = out_BLND[:, rows] * keep + out_BSND.float() * take
    lse_BNL[:, :, rows] = new
