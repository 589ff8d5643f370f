"""GPT-2 and Llama family decoder-only transformer, written as single-device PyTorch.

Tensor and sequence parallelism are applied from outside by `megalith.core.parallelize.parallelize`, which
swaps the linears and embeddings for their parallel versions; this file does not change for them.
Shape legend: B batch, S sequence (S/tp between layers under sequence parallelism), H hidden, N query
heads, K key/value heads (both per tp rank), D head dim, V vocabulary (padded; this rank's shard under tp).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalith.core.checkpoint.spec import ShardSpec
from megalith.core.config import ModelConfig
from megalith.core.models.kv_cache import KVCache, LayerKVCache
from megalith.core.models.ops import get_ops
from megalith.core.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.core.parallel.layers import local_from_canonical, padded_vocab_size, vocab_shard_spec
from megalith.core.parallel.random import REPLICATED, TENSOR_PARALLEL, RNGTracker, derive_seed
from megalith.core.recompute import checkpoint

IGNORE_INDEX = -100


def rope_tables(seq_len: int, config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, D/2] (float32) for positions 0..S-1, with Llama-3 frequency scaling when configured."""
    return rope_tables_at(torch.arange(seq_len, device=device), config)


def rope_tables_at(positions: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., D/2] (float32) for integer `positions` of any shape (e.g. [B, S] when decoding)."""
    inv_freq = rope_inv_freq(config, device=positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """The D/2 rotary frequencies (float64), Llama-3 scaled when `config.rope_scaling` is set."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    scaling = config.rope_scaling
    if scaling is not None:
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between blended.
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        blend = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1.0 - blend) * inv_freq / factor + blend * inv_freq
    return inv_freq


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the hidden dimension."""

    def __init__(self, config: ModelConfig, ops):
        super().__init__()
        self.kind, self.eps, self.ops = config.norm, config.norm_eps, ops
        self.weight = nn.Parameter(torch.empty(config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.hidden_size)) if config.norm == "layernorm" else None

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return self.ops.rms_norm(x_BSH, self.weight, self.eps)
        return self.ops.layer_norm(x_BSH, self.weight, self.bias, self.eps)


class Dropout(nn.Module):
    """Dropout drawing its mask from a named RNG stream (replicated across tp unless the input is sharded)."""

    def __init__(self, p: float, rng: RNGTracker, stream: str = REPLICATED):
        super().__init__()
        self.p, self.rng, self.stream = p, rng, stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.rng.fork(self.stream):
            return F.dropout(x, self.p, training=True)


class Embedding(nn.Embedding):
    """Token embedding that can also serve as the (tied) output projection."""

    def attend(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BSH, self.weight)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and optional RoPE."""

    def __init__(self, config: ModelConfig, ops, rng: RNGTracker):
        super().__init__()
        self.config, self.ops, self.rng = config, ops, rng
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        d = self.head_dim
        self.qkv = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * d, bias=config.bias)
        self.proj = nn.Linear(self.num_heads * d, config.hidden_size, bias=config.bias)
        self.dropout_p = config.attention_dropout
        self.recompute_core = config.recompute == "selective"

    def forward(self, x_BSH: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        """Self-attention over positions 0..S-1, or, with `cache`, over the cached slots plus the new ones."""
        qkv = self.qkv(x_BSH)  # [B, S, (N + 2K) D]: under SP the sequence was gathered to full length here
        b, s, _ = qkv.shape
        n, k, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_BSND, k_BSKD, v_BSKD = qkv.split([n * d, k * d, k * d], dim=-1)
        q_BSND, k_BSKD, v_BSKD = q_BSND.view(b, s, n, d), k_BSKD.view(b, s, k, d), v_BSKD.view(b, s, k, d)
        if cache is not None:  # incremental decoding: positions and the mask come from the cache
            if self.config.position_embedding == "rope":
                q_BSND, k_BSKD = cache.rope(q_BSND), cache.rope(k_BSKD)
            return self.proj(cache.attend(q_BSND, k_BSKD, v_BSKD).reshape(b, s, n * d))
        if self.config.position_embedding == "rope":
            cos, sin = rope_tables(s, self.config, device=x_BSH.device)
            q_BSND, k_BSKD = self.ops.rope(q_BSND, cos, sin), self.ops.rope(k_BSKD, cos, sin)
        if self.recompute_core and self.training:
            out_BSND = checkpoint(self._core, q_BSND, k_BSKD, v_BSKD, rng=self.rng)
        else:
            out_BSND = self._core(q_BSND, k_BSKD, v_BSKD)
        return self.proj(out_BSND.reshape(b, s, n * d))

    def _core(self, q_BSND, k_BSKD, v_BSKD):
        p = self.dropout_p if self.training else 0.0
        if p == 0.0:
            return self.ops.attention(q_BSND, k_BSKD, v_BSKD, causal=True)
        with self.rng.fork(TENSOR_PARALLEL):  # heads are sharded over tp: independent masks per rank
            return self.ops.attention(q_BSND, k_BSKD, v_BSKD, causal=True, dropout_p=p)


class MLP(nn.Module):
    """GeLU MLP (fc1: [F, H]) or SwiGLU (fc1: [2F, H] = gate rows then up rows)."""

    def __init__(self, config: ModelConfig, ops):
        super().__init__()
        self.ops, self.swiglu = ops, config.activation == "swiglu"
        width = 2 * config.ffn_hidden_size if self.swiglu else config.ffn_hidden_size
        self.fc1 = nn.Linear(config.hidden_size, width, bias=config.bias)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        h_BSF = self.fc1(x_BSH)
        if self.swiglu:
            gate_BSF, up_BSF = h_BSF.chunk(2, dim=-1)  # under tp: this rank's [gate_r; up_r]
            return self.fc2(self.ops.swiglu(gate_BSF, up_BSF))
        return self.fc2(self.ops.gelu(h_BSF))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); RoPE positions are 0..S-1."""

    def __init__(self, config: ModelConfig, layer_id: int, ops, rng: RNGTracker):
        super().__init__()
        self.layer_id, self.rng = layer_id, rng
        self.attn_norm = Norm(config, ops)
        self.attn = Attention(config, ops, rng)
        self.mlp_norm = Norm(config, ops)
        self.mlp = MLP(config, ops)
        self.dropout = Dropout(config.hidden_dropout, rng)
        self.recompute = config.recompute == "full" and layer_id % config.recompute_every == 0

    def forward(self, x_BSH: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """One block; with `cache` (an open KVCache step), attention reads and extends the cache."""
        if cache is not None:
            return self._forward(x_BSH, cache.layer(self.layer_id))
        if self.recompute and self.training:
            return checkpoint(self._forward, x_BSH, rng=self.rng)
        return self._forward(x_BSH)

    def _forward(self, x_BSH: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x_BSH = x_BSH + self.dropout(self.attn(self.attn_norm(x_BSH), cache))
        return x_BSH + self.dropout(self.mlp(self.mlp_norm(x_BSH)))


class Transformer(nn.Module):
    """Decoder-only language model; one pipeline stage when `layer_ids` / `first_stage` / `last_stage` say so.

    Args:
        config: the architecture.
        dims: a ParallelDims; when given, tensor (and sequence) parallelism is applied with `parallelize`.
        layer_ids: global indices of the layers this stage holds (default: all).
        first_stage: holds the token (and position) embedding.
        last_stage: holds the final norm and the output projection (and the embedding when tied).
        sequence_parallel: with dims.tp > 1, shard activations between layers along the sequence.
        seed: base seed of the initialisation (weights depend only on it and the canonical name) and dropout.
        device, dtype: where and in what precision to create the parameters.
        empty_init: allocate the parameters without drawing initial values (they are about to be loaded).
    """

    def __init__(
        self,
        config: ModelConfig,
        dims=None,
        *,
        layer_ids=None,
        first_stage: bool = True,
        last_stage: bool = True,
        sequence_parallel: bool = False,
        seed: int = 0,
        device=None,
        dtype=None,
        empty_init: bool = False,
    ):
        super().__init__()
        self.config = config
        self.first_stage, self.last_stage = first_stage, last_stage
        layer_ids = list(range(config.num_layers)) if layer_ids is None else [int(i) for i in layer_ids]
        bad = [i for i in layer_ids if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"Transformer: layer_ids {bad} outside 0..{config.num_layers - 1}")
        self.rng = RNGTracker(seed, device=device or "cpu")
        # Parallel state read by head/loss; `parallelize` sets them (tp group, first column of this rank).
        self.tp_group, self.vocab_offset = None, 0
        self.ops = ops = get_ops(config.kernels)
        h, vp = config.hidden_size, padded_vocab_size(config.vocab_size)
        with torch.device("meta"):
            self.embed = Embedding(vp, h) if first_stage or (last_stage and config.tie_embeddings) else None
            use_pos = first_stage and config.position_embedding == "learned"
            self.pos_embed = nn.Embedding(config.max_seq_len, h) if use_pos else None
            self.embed_dropout = Dropout(config.hidden_dropout, self.rng)
            self.layers = nn.ModuleDict({str(i): TransformerLayer(config, i, ops, self.rng) for i in layer_ids})
            self.final_norm = Norm(config, ops) if last_stage else None
            use_output = last_stage and not config.tie_embeddings
            self.output = nn.Linear(h, vp, bias=False) if use_output else None
        for module in (self.embed, self.output):
            if module is not None:
                module.weight.megalith_shard = vocab_shard_spec(config.vocab_size, h, vp, 1, 0)
        if dims is not None:
            from megalith.core.parallelize import parallelize  # the model file stays free of parallel code

            parallelize(self, dims, sequence_parallel=sequence_parallel)
        self.init_weights(seed, device=device, dtype=dtype, empty=empty_init)

    def embed_tokens(self, input_ids_BS: torch.Tensor, positions_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Token (+ learned position) embeddings: [B, S] ids -> [B, S, H] hidden.

        Positions are 0..S-1 unless `positions_BS` gives each token's own (incremental decoding).
        """
        s = input_ids_BS.shape[1]
        if positions_BS is None and s > self.config.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len {self.config.max_seq_len}")
        h_BSH = self.embed(input_ids_BS)
        if self.pos_embed is not None and positions_BS is None:
            h_BSH = h_BSH + self.pos_embed(torch.arange(s, device=input_ids_BS.device)).unsqueeze(0)
        elif self.pos_embed is not None:
            top = int(positions_BS.max()) if positions_BS.numel() else 0
            if top >= self.config.max_seq_len:
                raise ValueError(
                    f"position {top} exceeds the learned positions (max_seq_len {self.config.max_seq_len})"
                )
            h_BSH = h_BSH + self.pos_embed(positions_BS)
        return self.embed_dropout(h_BSH)

    def head(self, h_BSH: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: logits [B, S, V] (padding columns are -inf, never predicted)."""
        h_BSH = self.final_norm(h_BSH)
        logits_BSV = self.output(h_BSH) if self.output is not None else self.embed.attend(h_BSH)
        if self.vocab_offset + logits_BSV.shape[-1] <= self.config.vocab_size:
            return logits_BSV  # no padding columns on this rank
        columns = torch.arange(logits_BSV.shape[-1], device=logits_BSV.device) + self.vocab_offset
        return logits_BSV.masked_fill(columns >= self.config.vocab_size, float("-inf"))

    def loss(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, S]; labels equal to -100 give 0."""
        if self.tp_group is None:  # the whole vocabulary is on this rank; padding columns are dropped
            return self.ops.cross_entropy(
                logits_BSV[..., : self.config.vocab_size], labels_BS, ignore_index=IGNORE_INDEX,
                label_smoothing=self.config.label_smoothing,
            )  # fmt: skip
        return vocab_parallel_cross_entropy(
            logits_BSV, labels_BS, group=self.tp_group, vocab_start=self.vocab_offset,
            vocab_size=self.config.vocab_size, label_smoothing=self.config.label_smoothing,
            ignore_index=IGNORE_INDEX, kernels=self.config.kernels,
        )  # fmt: skip

    def forward(self, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor | None = None) -> torch.Tensor:
        h_BSH = self.embed_tokens(input_ids_BS)
        for layer in self.layers.values():
            h_BSH = layer(h_BSH)
        logits_BSV = self.head(h_BSH)
        return logits_BSV if labels_BS is None else self.loss(logits_BSV, labels_BS)

    def forward_cached(
        self,
        input_ids_BS: torch.Tensor,
        cache: KVCache,
        *,
        valid_BS: torch.Tensor | None = None,
        positions_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Incremental forward (inference, pp=1): appends S tokens per row to `cache`, returns hidden [B, S, H].

        `valid_BS` marks the real tokens (False: padding, never attended to); positions default to the count
        of real tokens before each one in its row. Apply `head` to the rows of interest to get logits.
        """
        if not (self.first_stage and self.last_stage):
            raise ValueError("forward_cached needs the whole model (first and last stage)")
        if self.training:
            raise RuntimeError("forward_cached is for inference; call model.eval() first")
        positions_BS = cache.begin(input_ids_BS.shape[1], valid_BS, positions_BS)
        try:
            h_BSH = self.embed_tokens(input_ids_BS, positions_BS)
            for layer in self.layers.values():
                h_BSH = layer(h_BSH, cache)
        except BaseException:
            cache.abort()
            raise
        cache.commit()
        return h_BSH

    @torch.no_grad()
    def init_weights(self, seed: int = 0, *, device=None, dtype=None, empty: bool = False) -> None:
        """Sets every parameter from its canonical full tensor, drawn from a generator seeded by (seed, name).

        The full tensor is drawn whatever this rank holds and then sliced, so the weights are the same for
        every tp / pp layout. Vocabulary padding rows are zero. With `empty`, parameters are only allocated
        (uninitialised, padding rows zero) for a checkpoint to fill.
        """
        for module_name, module in self.named_modules():
            for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
                full_name = f"{module_name}.{name}" if module_name else name
                spec: ShardSpec | None = getattr(param, "megalith_shard", None)
                target_device = device if device is not None else (None if param.is_meta else param.device)
                target_dtype = dtype or (param.dtype if not param.is_meta else torch.get_default_dtype())
                if empty:
                    local = torch.empty(param.shape, device=target_device, dtype=target_dtype)
                    if full_name in ("embed.weight", "output.weight"):
                        local.zero_()  # vocabulary padding rows are never loaded
                else:
                    shape = spec.global_shape if spec is not None else tuple(param.shape)
                    full = init_tensor(full_name, shape, self.config, seed)
                    local = local_from_canonical(full, spec, param.shape)
                new = nn.Parameter(local.to(device=target_device, dtype=target_dtype), param.requires_grad)
                new.__dict__.update({k: v for k, v in param.__dict__.items() if k.startswith("megalith_")})
                module.register_parameter(name, new)


def init_tensor(name: str, shape, config: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of canonical parameter `name` (float32, CPU)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = config.init_std
    if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
        std = std / math.sqrt(2.0 * config.num_layers)  # residual-branch outputs: keep the stream's scale
    generator = torch.Generator().manual_seed(derive_seed(seed, "init", name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)
