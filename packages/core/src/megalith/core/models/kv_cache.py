"""Key/value cache for incremental decoding with `Transformer.forward(ids, cache)` (inference only).

The cache is a row of slots per sequence. Each cached forward appends the same number of new slots to every
row (the batch moves in lockstep) and says which of them hold real tokens (`valid`); slots that hold padding
are never attended to, so prompts of different lengths can be padded on the left or on the right. A token's
position (for RoPE or learned position embeddings) is by default the number of real tokens before it in its
row, so padding does not shift positions.

Shape legend: B batch, T slot capacity, S new slots of this call, K key/value heads (this tp rank's), D head
dim, R = D/2 rotary frequencies.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KVCache", "LayerKVCache"]


class KVCache:
    """Per-layer keys and values of the tokens a model has seen, plus the state of the current step.

    Args:
        model: the Transformer (stage) the cache is for; its layers (and their local head counts under tp)
            fix the shapes.
        batch_size: number of sequences B.
        capacity: slots per sequence T (prompt slots, padding included, plus tokens to generate).
        device, dtype: of the key/value buffers (default: those of the model's parameters).
    """

    def __init__(self, model: nn.Module, batch_size: int, capacity: int, *, device=None, dtype=None) -> None:
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"KVCache: batch_size ({batch_size}) and capacity ({capacity}) must be positive")
        for module in model.modules():
            if getattr(module, "sequence_parallel", False):
                raise ValueError("KVCache: a model built with sequence_parallel=True cannot decode incrementally")
        if model.embed is None or model.final_norm is None:
            raise ValueError("KVCache: decoding needs the whole model (not a pipeline stage)")
        param = next(model.parameters())
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        self.batch_size, self.capacity = batch_size, capacity
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        for name, layer in model.layers.items():
            shape = (batch_size, capacity, layer.attn.num_kv_heads, layer.attn.head_dim)
            self.keys[name] = torch.zeros(shape, device=device, dtype=dtype)
            self.values[name] = torch.zeros(shape, device=device, dtype=dtype)
        self.valid_BT = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.positions_BT = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.length = 0
        # State of the step in progress (set by `begin`, cleared by `commit`).
        self._start = self._end = None
        self.mask_B1ST: torch.Tensor | None = None  # T = the slots up to the end of this step
        self.positions_BS: torch.Tensor | None = None

    def begin(
        self, num_new: int, valid_BS: torch.Tensor | None = None, positions_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Opens a step that appends `num_new` slots; returns the positions [B, S] of the new tokens.

        Args:
            num_new: S, the number of new slots in every row.
            valid_BS: which new slots hold real tokens (default: all).
            positions_BS: explicit positions; default: the count of real tokens before each slot in its row.
        """
        if self._start is not None:
            raise RuntimeError("KVCache.begin: the previous step was not committed")
        b, start = self.batch_size, self.length
        end = start + num_new
        if num_new < 1:
            raise ValueError(f"KVCache.begin: num_new must be positive, got {num_new}")
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} slots needed but the cache holds {self.capacity}")
        device = self.valid_BT.device
        if valid_BS is None:
            valid_BS = torch.ones(b, num_new, dtype=torch.bool, device=device)
        valid_BS = valid_BS.to(device=device, dtype=torch.bool)
        if tuple(valid_BS.shape) != (b, num_new):
            raise ValueError(f"KVCache.begin: valid has shape {tuple(valid_BS.shape)}, expected {(b, num_new)}")
        if positions_BS is None:
            before_B1 = self.valid_BT[:, :start].sum(dim=1, keepdim=True)
            positions_BS = before_B1 + valid_BS.long().cumsum(dim=1) - valid_BS.long()
        positions_BS = positions_BS.to(device=device, dtype=torch.long)
        if tuple(positions_BS.shape) != (b, num_new):
            raise ValueError(
                f"KVCache.begin: positions have shape {tuple(positions_BS.shape)}, expected {(b, num_new)}"
            )
        self.valid_BT[:, start:end] = valid_BS
        self.positions_BT[:, start:end] = positions_BS
        # Query slot q sees key slot k when k <= q and k holds a real token; every query also sees itself,
        # so a padding query has a finite (unused) output instead of NaN.
        q_S = torch.arange(start, end, device=device)
        k_E = torch.arange(end, device=device)
        causal_SE = k_E[None, :] <= q_S[:, None]
        self_SE = k_E[None, :] == q_S[:, None]
        self.mask_B1ST = (causal_SE[None] & (self.valid_BT[:, None, :end] | self_SE[None])).unsqueeze(1)
        self.positions_BS = positions_BS
        self._start, self._end = start, end
        return positions_BS

    def run(
        self,
        model: nn.Module,
        ids_BS: torch.Tensor,
        *,
        valid_BS: torch.Tensor | None = None,
        positions_BS: torch.Tensor | None = None,
        select_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step: appends `ids_BS` (S new slots per row) through `model` and returns its logits.

        `valid_BS` marks real tokens (padding is never attended to); positions default to the count of real
        tokens before each slot in its row; `select_B` returns only one position's logits per row ([B, 1, V]).
        A failure inside the forward leaves the cache as it was.
        """
        if model.training:
            raise RuntimeError("KVCache.run is for inference; call model.eval() first")
        self.begin(ids_BS.shape[1], valid_BS, positions_BS)
        try:
            logits = model(ids_BS, self, select_B=select_B)
        except BaseException:
            self.abort()
            raise
        self.commit()
        return logits

    def layer(self, layer_id: int | str) -> LayerKVCache:
        """The view one layer's attention reads and writes during the open step."""
        if self._start is None:
            raise RuntimeError("KVCache.layer: no step is open (call begin first)")
        return LayerKVCache(self, str(layer_id))

    def commit(self) -> None:
        """Closes the step: the new slots become part of the cached history."""
        if self._end is None:
            raise RuntimeError("KVCache.commit: no step is open")
        self.length = self._end
        self._start = self._end = None
        self.mask_B1ST = self.positions_BS = None

    def abort(self) -> None:
        """Drops an open step (e.g. after an error inside the forward); the cache is as before `begin`."""
        if self._start is not None:
            self.valid_BT[:, self._start : self._end] = False
        self._start = self._end = None
        self.mask_B1ST = self.positions_BS = None


class LayerKVCache:
    """One layer's part of an open `KVCache` step."""

    def __init__(self, cache: KVCache, name: str) -> None:
        self.cache, self.name = cache, name

    @property
    def positions_BS(self) -> torch.Tensor:
        return self.cache.positions_BS

    @property
    def mask_B1ST(self) -> torch.Tensor:
        return self.cache.mask_B1ST

    def extend(self, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores the step's new keys/values; returns every slot's keys and values so far [B, T, K, D]."""
        cache = self.cache
        start, end = cache._start, cache._end
        keys, values = cache.keys[self.name], cache.values[self.name]
        keys[:, start:end] = k_BSKD
        values[:, start:end] = v_BSKD
        return keys[:, :end], values[:, :end]
