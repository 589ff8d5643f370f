"""GPT-2 and Llama family decoder-only transformer, written as single-device PyTorch.

Nothing here knows about process groups, pipeline stages or recomputation. Functions from outside change the
model in one documented order (`megalith.core.build`): tensor/sequence parallelism swaps linears and embeddings
for their parallel versions, `apply_recompute` and `apply_kernels` change how modules run, the pipeline split
removes the modules a stage does not hold (set to None: `forward` passes over what is absent), and the data
parallel wrapper goes around the result. The loss is `megalith.core.loss`, outside the model.

Packed documents travel with the input, not in the model: `forward` optionally takes each token's position
(`position_ids`, restarting at each document) and the documents' bounds (`cu_seqlens`, see
`megalith.core.models.packing`); attention then never crosses a document boundary. Context parallelism swaps
`AttentionCore` (`megalith.core.context_parallel`), which receives the same documents.

Shape legend: B batch, S sequence (S/tp between layers under sequence parallelism), H hidden, N query heads,
K key/value heads (both per tp rank), D head dim, V vocabulary (this rank's shard under tp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalith.core.config import ModelConfig
from megalith.core.models.kv_cache import KVCache, LayerKVCache
from megalith.core.models.mlp import MLP
from megalith.core.models.ops import TorchOps
from megalith.core.models.packing import Documents
from megalith.core.models.rope import RotaryTables
from megalith.core.moe.layer import MoE
from megalith.core.parallel.random import REPLICATED, TENSOR_PARALLEL, RNGTracker

__all__ = [
    "IGNORE_INDEX",
    "MLP",
    "Attention",
    "AttentionCore",
    "Dropout",
    "HeadNorm",
    "Transformer",
    "TransformerLayer",
]

IGNORE_INDEX = -100


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the hidden dimension."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, self.eps, self.ops = config.norm, config.norm_eps, TorchOps()
        self.weight = nn.Parameter(torch.empty(config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.hidden_size)) if config.norm == "layernorm" else None

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return self.ops.rms_norm(x_BSH, self.weight, self.eps)
        return self.ops.layer_norm(x_BSH, self.weight, self.bias, self.eps)


class HeadNorm(nn.Module):
    """RMSNorm over the head dimension of every head ([..., heads, D]; one weight [D] shared by the heads)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps, self.ops = config.norm_eps, TorchOps()
        self.weight = nn.Parameter(torch.empty(config.head_dim))

    def forward(self, x_BSND: torch.Tensor) -> torch.Tensor:
        shape = x_BSND.shape
        return self.ops.rms_norm(x_BSND.reshape(-1, shape[-1]), self.weight, self.eps).view(shape)


class Dropout(nn.Module):
    """Dropout (p = 0 until `apply_dropout` sets it) drawing its mask from one of the model's RNG streams.

    The stream is "replicated" (the same mask on every tp rank) for activations that are identical across tp,
    and "tp" (its own mask per rank) once sequence parallelism shards them.
    """

    def __init__(self, rng: RNGTracker, stream: str = REPLICATED):
        super().__init__()
        self.p, self.rng, self.stream = 0.0, rng, stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.rng.fork(self.stream):
            return F.dropout(x, self.p, training=True)


class Embedding(nn.Embedding):
    """Token embedding that can also serve as the (tied) output projection."""

    def attend(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BSH, self.weight)


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(D)) v with causal masking and grouped-query heads (what selective recompute wraps).

    With `documents`, each query sees only the earlier keys of its own document.
    """

    def __init__(self, rng: RNGTracker):
        super().__init__()
        self.ops, self.rng, self.dropout_p = TorchOps(), rng, 0.0

    def forward(self, q_BSND, k_BTKD, v_BTKD, mask_B1ST=None, documents: Documents | None = None):
        if documents is not None:
            documents.check_tokens(q_BSND.shape[0], q_BSND.shape[1], "attention")
        p = self.dropout_p if self.training else 0.0
        if p == 0.0:
            return self.ops.attention(q_BSND, k_BTKD, v_BTKD, causal=True, mask_B1ST=mask_B1ST, documents=documents)
        with self.rng.fork(TENSOR_PARALLEL):  # heads are sharded over tp: independent masks per rank
            return self.ops.attention(
                q_BSND, k_BTKD, v_BTKD, causal=True, dropout_p=p, mask_B1ST=mask_B1ST, documents=documents
            )


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, optional RoPE and optional qk-norm (RMSNorm per head of q
    and k, before RoPE, as Qwen3 and OLMo do)."""

    def __init__(self, config: ModelConfig, rope: RotaryTables | None, rng: RNGTracker):
        super().__init__()
        self.ops, self.rope = TorchOps(), rope
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_kv_heads
        self.head_dim = d = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * d, bias=config.bias)
        self.q_norm = HeadNorm(config) if config.qk_norm else None
        self.k_norm = HeadNorm(config) if config.qk_norm else None
        self.core = AttentionCore(rng)
        self.proj = nn.Linear(self.num_heads * d, config.hidden_size, bias=config.bias)

    def forward(
        self,
        x_BSH: torch.Tensor,
        cache: LayerKVCache | None = None,
        positions_BS: torch.Tensor | None = None,
        documents: Documents | None = None,
    ) -> torch.Tensor:
        """Self-attention over positions 0..S-1 (or `positions_BS`), within `documents` when given; with `cache`,
        over the cached slots plus the new ones."""
        qkv = self.qkv(x_BSH)  # [B, S, (N + 2K) D]: under SP the sequence was gathered to full length here
        b, s, _ = qkv.shape
        n, k, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_BSND, k_BSKD, v_BSKD = qkv.split([n * d, k * d, k * d], dim=-1)
        q_BSND, k_BSKD, v_BSKD = q_BSND.view(b, s, n, d), k_BSKD.view(b, s, k, d), v_BSKD.view(b, s, k, d)
        if self.q_norm is not None:
            q_BSND, k_BSKD = self.q_norm(q_BSND), self.k_norm(k_BSKD)
        if self.rope is not None:
            cos, sin = self.rope(s, x_BSH.device, positions_BS if cache is None else cache.positions_BS)
            q_BSND, k_BSKD = self.ops.rope(q_BSND, cos, sin), self.ops.rope(k_BSKD, cos, sin)
        if cache is None:
            out_BSND = self.core(q_BSND, k_BSKD, v_BSKD, documents=documents)
        else:  # incremental decoding: store the new keys/values, attend over every visible slot
            k_BTKD, v_BTKD = cache.extend(k_BSKD, v_BSKD)
            out_BSND = self.core(q_BSND, k_BTKD, v_BTKD, cache.mask_B1ST)
        return self.proj(out_BSND.reshape(b, s, n * d))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is a mixture of experts (`MoE`) in the
    layers `config.is_moe_layer` selects."""

    def __init__(self, config: ModelConfig, layer_id: int, rope: RotaryTables | None, rng: RNGTracker):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = Norm(config)
        self.attn = Attention(config, rope, rng)
        self.mlp_norm = Norm(config)
        self.mlp = MoE(config, rng) if config.is_moe_layer(layer_id) else MLP(config)
        self.dropout = Dropout(rng)

    def forward(
        self,
        x_BSH: torch.Tensor,
        cache: KVCache | None = None,
        positions_BS: torch.Tensor | None = None,
        documents: Documents | None = None,
    ) -> torch.Tensor:
        """One block; with `cache` (an open KVCache step), attention reads and extends the cache."""
        layer_cache = None if cache is None else cache.layer(self.layer_id)
        x_BSH = x_BSH + self.dropout(self.attn(self.attn_norm(x_BSH), layer_cache, positions_BS, documents))
        return x_BSH + self.dropout(self.mlp(self.mlp_norm(x_BSH)))


class Transformer(nn.Module):
    """Decoder-only language model: token ids [B, S] in, logits [B, S, V] out.

    Parameters are created on the current default device and left uninitialised; `init_weights` (in
    `megalith.core.models.init`) draws them. A pipeline stage is this model with the modules it does not hold
    removed: `forward` then takes hidden states when the input is floating point (a later stage), and returns
    hidden states when there is no final norm (an earlier stage).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, v = config.hidden_size, config.vocab_size
        self.rng = RNGTracker(0)  # dropout streams; reseeded per rank and per step by the training loop
        rope = RotaryTables(config) if config.position_embedding == "rope" else None
        self.embed = Embedding(v, h)
        self.pos_embed = nn.Embedding(config.max_seq_len, h) if config.position_embedding == "learned" else None
        self.embed_dropout = Dropout(self.rng)
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, i, rope, self.rng)
                                     for i in range(config.num_layers)})  # fmt: skip
        self.final_norm = Norm(config)
        self.output = None if config.tie_embeddings else nn.Linear(h, v, bias=False)

    def embed_tokens(self, input_ids_BS: torch.Tensor, positions_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Token (+ learned position) embeddings: [B, S] ids -> [B, S, H] hidden.

        Positions are 0..S-1 unless `positions_BS` gives each token's own (incremental decoding).
        """
        s = input_ids_BS.shape[1]
        if positions_BS is None and s > self.config.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len {self.config.max_seq_len}")
        h_BSH = self.embed(input_ids_BS)
        if self.pos_embed is not None:
            if positions_BS is None:
                h_BSH = h_BSH + self.pos_embed(torch.arange(s, device=input_ids_BS.device)).unsqueeze(0)
            else:
                top = int(positions_BS.max()) if positions_BS.numel() else 0
                if top >= self.config.max_seq_len:
                    raise ValueError(
                        f"position {top} exceeds the learned positions (max_seq_len {self.config.max_seq_len})"
                    )
                h_BSH = h_BSH + self.pos_embed(positions_BS)
        return self.embed_dropout(h_BSH)

    def head(self, h_BSH: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden [B, S, H] -> logits [B, S, V]."""
        h_BSH = self.final_norm(h_BSH)
        return self.output(h_BSH) if self.output is not None else self.embed.attend(h_BSH)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        select_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [B, S] (or a previous stage's hidden states [B, S, H]) -> logits (or hidden states).

        Args:
            x: token ids, or hidden states on a later pipeline stage.
            cache: inference: the tokens are appended to the KV cache at the positions it assigns.
            position_ids: int64 [B, S], each token's position (RoPE or learned positions); default 0..S-1.
                Packed documents restart them at each document; context parallelism gives each rank's own.
            cu_seqlens: int32 [num_docs + 1], the packed documents (`megalith.core.models.packing`): attention
                stays inside each document. Under context parallelism it describes the full sequence.
            select_B: one position per row: only those positions' logits are returned, [B, 1, V].
        """
        if cache is not None and (position_ids is not None or cu_seqlens is not None):
            raise ValueError("position_ids and cu_seqlens are for training and scoring, not for decoding with a cache")
        positions_BS = position_ids if cache is None else cache.positions_BS
        documents = None if cu_seqlens is None else Documents.from_cu_seqlens(cu_seqlens, x.shape[0])
        h_BSH = x if x.is_floating_point() else self.embed_tokens(x, positions_BS)
        for layer in self.layers.values():
            h_BSH = layer(h_BSH, cache, positions_BS, documents)
        if self.final_norm is None:
            return h_BSH
        if select_B is not None:
            h_BSH = h_BSH[torch.arange(h_BSH.shape[0], device=h_BSH.device), select_B].unsqueeze(1)
        return self.head(h_BSH)
