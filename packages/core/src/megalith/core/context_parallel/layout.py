"""Context parallelism's sequence layout: which tokens each cp rank holds, and a micro-batch cut down to them.

The sequence of every sample is cut into 2 * cp chunks of C = S / (2 * cp) tokens; cp rank i holds chunks i
and 2 * cp - 1 - i, in that order (its L = 2C tokens). Under causal attention an early chunk attends to few
keys and a late one to many, so pairing them gives every rank the same attention work (the layout of
Megatron-Core and torchtitan).

Shape legend: B batch, S full sequence, L = S / cp tokens held by one rank, C = S / (2 * cp) tokens per chunk.
"""

from __future__ import annotations

import torch

__all__ = [
    "SEQUENCE_KEYS",
    "check_sequence_length",
    "local_positions",
    "rank_chunks",
    "shard_microbatch",
    "shard_sequence",
    "unshard_sequence",
]

SEQUENCE_KEYS = ("input_ids", "tokens", "labels", "position_ids", "loss_mask")
"""Micro-batch entries laid out [B, S, ...] that `shard_microbatch` cuts; others (cu_seqlens) are kept whole."""


def check_sequence_length(seq_len: int, cp: int, what: str = "the sequence length") -> None:
    """Raises ValueError naming both numbers when `seq_len` cannot be cut into 2 * cp equal chunks."""
    if seq_len % (2 * cp):
        raise ValueError(
            f"{what} ({seq_len}) is not divisible by 2 * cp = {2 * cp}: context parallelism cuts every sequence "
            f"into 2 * cp equal chunks (cp = {cp})"
        )


def rank_chunks(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of 2 * cp) that cp rank `cp_rank` holds, in the order it holds them."""
    return cp_rank, 2 * cp - 1 - cp_rank


def local_positions(seq_len: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions in the full sequence of the L tokens cp rank `cp_rank` holds, int64 [L]."""
    check_sequence_length(seq_len, cp)
    chunk = seq_len // (2 * cp)
    first, second = rank_chunks(cp, cp_rank)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in (first, second)])


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """The part of `x` (full sequence along `dim`) that cp rank `cp_rank` holds: its two chunks, concatenated."""
    check_sequence_length(x.shape[dim], cp)
    chunk = x.shape[dim] // (2 * cp)
    first, second = rank_chunks(cp, cp_rank)
    return torch.cat([x.narrow(dim, first * chunk, chunk), x.narrow(dim, second * chunk, chunk)], dim)


def unshard_sequence(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The full sequence from every cp rank's part (in cp-rank order): the inverse of `shard_sequence`."""
    cp = len(parts)
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, second = rank_chunks(cp, rank)
        chunks[first], chunks[second] = part.chunk(2, dim)
    return torch.cat(chunks, dim)


def shard_microbatch(batch: dict, cp: int, cp_rank: int) -> dict:
    """This cp rank's part of a micro-batch of full sequences.

    Entries named in `SEQUENCE_KEYS` are cut to the rank's tokens. `position_ids` are always present in the
    result: the rank's own positions in the full sequence when the batch had none (RoPE and learned
    positions need them). `cu_seqlens` (packed documents) stays whole: the attention reads it for the full
    sequence. `num_loss_tokens` is added: the micro-batch's count of labels that are not -100 over the full
    sequence, so each rank's loss can be normalised by it (the ranks' partial losses then sum to the
    micro-batch's mean).
    """
    if cp == 1:
        return batch
    ids = batch["input_ids"]
    seq_len = ids.shape[1]
    check_sequence_length(seq_len, cp)
    out = dict(batch)
    if "position_ids" not in batch:
        positions = torch.arange(seq_len, device=ids.device).expand(ids.shape[0], seq_len)
        out["position_ids"] = positions
    if "labels" in batch:
        out["num_loss_tokens"] = (batch["labels"] != -100).sum()
    for key in SEQUENCE_KEYS:
        if key in out:
            if out[key].shape[1] != seq_len:
                raise ValueError(
                    f"micro-batch entry {key!r} has {out[key].shape[1]} tokens per row, input_ids {seq_len}"
                )
            out[key] = shard_sequence(out[key], cp, cp_rank)
    return out
