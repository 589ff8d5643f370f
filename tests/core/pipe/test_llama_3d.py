"""tp2 x pp2 x dp2 (8 ranks) with the real Llama-style Transformer: 3 steps equal to one process.

Needs megalith.core.models and megalith.core.ParallelDims (the core package); skipped where they are absent.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.harness import run_distributed

models = pytest.importorskip("megalith.core.models")

from megalith.core import ParallelDims  # noqa: E402
from megalith.core.config import ModelConfig  # noqa: E402
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig  # noqa: E402
from megalith.core.pipeline import build_stages, forward_backward  # noqa: E402

CONFIG = dict(
    family="llama", vocab_size=100, hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2,
    ffn_hidden_size=48, max_seq_len=16, norm="rmsnorm", activation="swiglu", position_embedding="rope",
    bias=False, tie_embeddings=False, init_std=0.2,
)  # fmt: skip
OPT = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
B, S, M, STEPS = 2, 16, 2, 3


def _batches(step: int, dp: int) -> list[list[dict]]:
    gen = torch.Generator().manual_seed(100 + step)
    flat = []
    for _ in range(M * dp):
        ids = torch.randint(0, CONFIG["vocab_size"], (B, S), generator=gen)
        labels = torch.randint(0, CONFIG["vocab_size"], (B, S), generator=gen)
        labels[:, :2] = -100
        flat.append({"input_ids": ids, "labels": labels})
    return [flat[d * M : (d + 1) * M] for d in range(dp)]


def _canonical(p: torch.Tensor) -> torch.Tensor:
    spec = getattr(p, "megalith_shard", None)
    if spec is None:
        return p.detach().clone()
    full = torch.zeros(spec.global_shape, dtype=p.dtype)
    for local_start, length, global_start in spec.pieces:
        full.narrow(spec.dim, global_start, length).copy_(p.detach().narrow(spec.dim, local_start, length))
    return full


def _local_view(p: torch.Tensor, full: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    spec = getattr(p, "megalith_shard", None)
    if spec is None:
        return [(p.detach(), full)]
    return [
        (p.detach().narrow(spec.dim, ls, n), full.narrow(spec.dim, gs, n)) for ls, n, gs in spec.pieces
    ]  # fmt: skip


def _worker(rank, world, ref_params):
    dims = ParallelDims(tp=2, pp=2, dp=2)
    config = ModelConfig(**CONFIG)
    factory = functools.partial(models.Transformer, config, dims, sequence_parallel=True, seed=0)
    chunks = build_stages(factory, config.num_layers, dims, tie_embeddings=config.tie_embeddings)
    chunks = [
        DistributedDataParallel(c, dims, DDPConfig(bucket_size=2000, use_distributed_optimizer=True)) for c in chunks
    ]
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, clip_grad=None))
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        batches = _batches(step, dims.dp)[dims.dp_rank]
        losses.append(forward_backward(chunks, batches, dims, hidden_shape=(B, S // dims.tp, config.hidden_size),
                                       dtype=torch.float32))  # fmt: skip
        assert opt.step().applied
    mismatches = []
    for c in chunks:
        for name, p in c.module.named_parameters():
            for got, want in _local_view(p, ref_params[name]):
                if not torch.allclose(got, want, rtol=1e-3, atol=5e-5):
                    mismatches.append((name, float((got - want).abs().max())))
    return losses, mismatches


@pytest.mark.slow
def test_llama_tp2_pp2_dp2_three_steps_match_one_process():
    config = ModelConfig(**CONFIG)
    model = models.Transformer(config, seed=0)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **OPT)
    ref_losses = []
    for step in range(STEPS):
        opt.zero_grad()
        batches = [b for rank_batches in _batches(step, 2) for b in rank_batches]
        loss = sum(model(b["input_ids"], b["labels"]).sum() / (b["labels"] != -100).sum() for b in batches) / len(
            batches
        )
        ref_losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    ref_params = {name: _canonical(p) for name, p in model.named_parameters()}
    results = run_distributed(_worker, 8, ref_params, timeout=300)
    for rank, (losses, mismatches) in enumerate(results):
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"rank {rank}"
        assert not mismatches, f"rank {rank}: {mismatches}"
