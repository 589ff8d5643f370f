"""The small model the pipeline / data-parallel tests train: the real Transformer, at a size a CPU runs in ms.

Legend: B batch, S sequence, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch

from megalith.core import ModelConfig, build_loss_fn, build_model_chunks

VOCAB, HIDDEN, SEQ = 32, 16, 8


def tiny_config(*, num_layers: int = 4, tie_embeddings: bool = False, **overrides) -> ModelConfig:
    """GPT-style (LayerNorm, GeLU, learned positions); a large init std gives sizeable gradients.

    Linear biases are off: the key part of the qkv bias has an exactly zero gradient (softmax is shift
    invariant), so Adam would turn its rounding noise into full-size, order-dependent updates.
    """
    return ModelConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=num_layers, num_attention_heads=2, ffn_hidden_size=32,
        max_seq_len=SEQ, tie_embeddings=tie_embeddings, init_std=0.3, bias=False, **overrides,
    )  # fmt: skip


def reference_model(config: ModelConfig, dtype=torch.float32) -> torch.nn.Module:
    """The whole model in this process (no torch.distributed), with the weights every layout starts from."""
    (model,) = build_model_chunks(config, dtype=dtype)
    return model


def make_batches(config: ModelConfig, num: int, batch: int, seed: int) -> list[dict]:
    """`num` micro-batches of random tokens; a few labels are -100 (ignored)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=gen)
        labels = torch.randint(0, config.vocab_size, (batch, config.max_seq_len), generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def reference_loss(model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
    """The one-process loss the schedules must reproduce: mean over micro-batches of each one's token mean."""
    loss_fn = build_loss_fn(model)
    total = 0.0
    for b in batches:
        per_token = loss_fn(model(b["input_ids"]), b["labels"])
        total = total + per_token.sum() / (b["labels"] != -100).sum().clamp(min=1)
    return total / len(batches)
