"""A tiny transformer with exactly the contract's model structure, for testing stages, schedules and DDP.

Legend: B batch, S sequence, H hidden, V vocabulary.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    vocab_size: int = 32
    hidden_size: int = 16
    num_layers: int = 4
    max_seq_len: int = 8
    tie_embeddings: bool = False
    seed: int = 0


class Layer(nn.Module):
    """Pre-norm block: single-head causal attention, then a GELU MLP, each with a residual."""

    def __init__(self, h: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(h)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(h, 3 * h, bias=False)  # a key bias gets a zero gradient (softmax shift)
        self.attn.proj = nn.Linear(h, h)
        self.mlp_norm = nn.LayerNorm(h)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(h, 2 * h)
        self.mlp.fc2 = nn.Linear(2 * h, h)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.attn_norm(x_BSH)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BSH = x_BSH + self.attn.proj(a)
        return x_BSH + self.mlp.fc2(F.gelu(self.mlp.fc1(self.mlp_norm(x_BSH))))


class TinyTransformer(nn.Module):
    """`TinyTransformer(config, *, layer_ids=None, first_stage=True, last_stage=True)` as in the contract."""

    def __init__(self, config: TinyConfig, *, layer_ids=None, first_stage: bool = True, last_stage: bool = True):
        super().__init__()
        self.config = config
        self.first_stage, self.last_stage = first_stage, last_stage
        h, v = config.hidden_size, config.vocab_size
        layer_ids = range(config.num_layers) if layer_ids is None else layer_ids
        if first_stage or (last_stage and config.tie_embeddings):
            self.embed = nn.Embedding(v, h)
        if first_stage:
            self.pos_embed = nn.Embedding(config.max_seq_len, h)
        self.layers = nn.ModuleDict({str(i): Layer(h) for i in layer_ids})
        if last_stage:
            self.final_norm = nn.LayerNorm(h)
            if not config.tie_embeddings:
                self.output = nn.Linear(h, v, bias=False)
        self._init_by_name()

    @torch.no_grad()
    def _init_by_name(self) -> None:
        # Every parameter is drawn from a generator seeded by its canonical name: identical at any pp split.
        for name, p in self.named_parameters():
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + zlib.crc32(name.encode()))
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))

    def embed_tokens(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device)
        return self.embed(input_ids_BS) + self.pos_embed(positions)

    def head(self, x_BSH: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.config.tie_embeddings else self.output.weight
        return F.linear(self.final_norm(x_BSH), weight)

    def loss(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        b, s, v = logits_BSV.shape
        flat = F.cross_entropy(logits_BSV.float().reshape(b * s, v), labels_BS.reshape(-1), reduction="none")
        return flat.view(b, s)

    def forward(self, input_ids, labels=None):
        h = self.embed_tokens(input_ids)
        for key in sorted(self.layers.keys(), key=int):
            h = self.layers[key](h)
        logits = self.head(h)
        return logits if labels is None else self.loss(logits, labels)


def make_batches(config: TinyConfig, num: int, batch: int, seed: int) -> list[dict]:
    """`num` micro-batches of random tokens; a few labels are -100 (ignored)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=gen)
        labels = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def reference_loss(model: TinyTransformer, batches: list[dict]) -> torch.Tensor:
    """The one-process loss the schedules must reproduce: mean over micro-batches of each one's token mean."""
    total = 0.0
    for b in batches:
        per_token = model(b["input_ids"], b["labels"])
        total = total + per_token.sum() / (b["labels"] != -100).sum().clamp(min=1)
    return total / len(batches)
