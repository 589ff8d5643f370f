"""Rotary position embedding tables (rotate-half convention, optional Llama-3 frequency scaling): the one RoPE.

Training, evaluation and incremental decoding all take their cos/sin tables from here and rotate with the
model's op set (`ops.rope`), which accepts tables for shared positions [S, R] or per-row positions [B, S, R]
(R = head_dim / 2).
"""

from __future__ import annotations

import math

import torch

from megalith.core._torch_compat import version_counter

__all__ = ["RotaryTables", "rope_inv_freq", "rope_tables_at"]


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None, device=None) -> torch.Tensor:
    """The head_dim / 2 rotary frequencies (float64), Llama-3 scaled when `scaling` is given."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if scaling is not None:
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between blended.
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        blend = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1.0 - blend) * inv_freq / factor + blend * inv_freq
    return inv_freq


def rope_tables_at(positions: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., R] (float32) for integer `positions` of any shape, for `config`'s heads."""
    inv_freq = rope_inv_freq(config.head_dim, config.rope_base, config.rope_scaling, device=positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


class RotaryTables:
    """The tables a model's attention layers share, computed once per sequence length and device.

    Every layer of one forward asks for the same length, so the tables are computed by the first layer and
    reused by the others (and by later steps). Explicit positions (decoding, packed documents, a context-parallel
    rank's tokens) are shared the same way within one forward: every layer passes the same tensor, so tables are
    kept for the last positions tensor seen, as long as it was not modified in place.
    """

    def __init__(self, config) -> None:
        self.config = config
        self._key: tuple[int, torch.device] | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._positions: tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, seq_len: int, device, positions: torch.Tensor | None = None):
        if torch.compiler.is_compiling():
            # Inside a compiled block the tables are part of the graph (a few thousand elements): filling a cache
            # there would make the first block's graph differ from the others' and compile twice.
            if positions is None:
                positions = torch.arange(seq_len, device=device)
            return rope_tables_at(positions, self.config)
        if positions is not None:
            if positions.is_inference():  # no version counter to tell whether it changed
                return rope_tables_at(positions, self.config)
            last = self._positions
            if last is None or last[0] is not positions or last[1] != version_counter(positions):
                last = self._positions = (positions, version_counter(positions), rope_tables_at(positions, self.config))
            return last[2]
        key = (seq_len, torch.device(device))
        if self._key != key:
            self._tables = rope_tables_at(torch.arange(seq_len, device=device), self.config)
            self._key = key
        return self._tables

    def __deepcopy__(self, memo) -> RotaryTables:
        return RotaryTables(self.config)  # cached tables are not state
