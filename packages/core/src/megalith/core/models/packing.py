"""Packed documents in a batch: the `cu_seqlens` convention the model accepts, checked once per forward.

A micro-batch of B rows of S tokens may hold several documents per row. `cu_seqlens` (int32, [num_docs + 1])
lists where each document starts in the batch flattened to B*S tokens, then B*S: flash-attn's varlen convention.
Every row starts a document (a document never continues into the next row). Zero-length entries are allowed
(repeated values), so per-row lists padded to a fixed length can be stacked by a data loader and joined with
`join_row_bounds`. Under context parallelism `cu_seqlens` still describes the full sequence: S is read from it
(B*S / B), not from the rank's share of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Documents", "join_row_bounds"]


@dataclass(frozen=True, eq=False)
class Documents:
    """The packed documents of one micro-batch, checked once and shared by every attention layer.

    Attributes:
        cu_seqlens: int32 [num_docs + 1], as described above.
        batch: B.
        seq_len: S, the full sequence length of each row.
        max_seqlen: the longest document.
        ids: int64 [B, S], the document of every token, numbered over the whole batch (so non-decreasing along
            the flattened batch, and different in different rows).
    """

    cu_seqlens: torch.Tensor
    batch: int
    seq_len: int
    max_seqlen: int
    ids: torch.Tensor

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, batch: int) -> Documents:
        """Checks `cu_seqlens` for a batch of `batch` rows (reads it on the host: one device sync on CUDA)."""
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            got = type(cu_seqlens).__name__
            if isinstance(cu_seqlens, torch.Tensor):
                got = f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [num_docs + 1], got {got}")
        values = cu_seqlens.cpu()
        total = int(values[-1]) if values.numel() else -1
        if values.numel() < 2 or int(values[0]) != 0 or total <= 0 or total % batch:
            shown = values.tolist()[:8]
            raise ValueError(f"cu_seqlens must run from 0 to batch * seq_len (batch {batch}), got {shown}...")
        lengths = values[1:] - values[:-1]
        if (lengths < 0).any():
            raise ValueError("cu_seqlens must be non-decreasing")
        seq_len = total // batch
        row_starts = torch.arange(0, total, seq_len, dtype=torch.int32)
        missing = row_starts[~torch.isin(row_starts, values)]
        if missing.numel():
            raise ValueError(
                f"cu_seqlens must start a document at every row of the [{batch}, {seq_len}] batch; row start "
                f"{int(missing[0])} is missing (a document cannot continue into the next row)"
            )
        tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
        # The last document starting at or before each token (zero-length documents are passed over).
        ids = (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).view(batch, seq_len)
        return cls(cu_seqlens, batch, seq_len, int(lengths.max()), ids)

    def check_tokens(self, batch: int, seq_len: int, where: str) -> None:
        """Raises ValueError when a [batch, seq_len] input does not match these documents' batch."""
        if (batch, seq_len) != (self.batch, self.seq_len):
            raise ValueError(
                f"{where}: cu_seqlens describes a [{self.batch}, {self.seq_len}] batch, the input is "
                f"[{batch}, {seq_len}]"
            )


def join_row_bounds(bounds_BX: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The batch's `cu_seqlens` from each row's document starts, [B, X] (0 first, seq_len last, padded by
    repeating seq_len), as data loaders stack them."""
    if bounds_BX.dim() != 2:
        raise ValueError(f"document bounds must be [batch, entries], got shape {tuple(bounds_BX.shape)}")
    if (bounds_BX[:, 0] != 0).any() or (bounds_BX[:, -1] != seq_len).any() or (bounds_BX.diff(dim=1) < 0).any():
        raise ValueError(f"each row's document bounds must rise from 0 to the sequence length {seq_len}")
    rows = torch.arange(bounds_BX.shape[0], device=bounds_BX.device, dtype=torch.int64)[:, None]
    flat = (bounds_BX.to(torch.int64) + rows * seq_len).flatten()
    return torch.unique_consecutive(flat).to(torch.int32)
