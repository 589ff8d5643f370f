"""tp2 x pp2 x dp2 (8 ranks) with the real Llama-style Transformer: 3 steps equal to one process."""

from __future__ import annotations

import pytest
import torch

from megalith.core import ModelConfig, ParallelConfig, ParallelDims, build_loss_fn, build_model_chunks
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
from megalith.core.pipeline import forward_backward, unwrap
from megalith.core.placement import named_placements
from tests.core.pipe.model import reference_loss, reference_model
from tests.harness import run_distributed

CONFIG = dict(
    family="llama", vocab_size=100, hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2,
    ffn_hidden_size=48, max_seq_len=16, norm="rmsnorm", activation="swiglu", position_embedding="rope",
    bias=False, tie_embeddings=False, init_std=0.2,
)  # fmt: skip
OPT = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
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


def _local_view(p: torch.Tensor, spec, full: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if spec is None:
        return [(p.detach(), full)]
    return [
        (p.detach().narrow(spec.dim, ls, n), full.narrow(spec.dim, gs, n)) for ls, n, gs in spec.pieces
    ]  # fmt: skip


def _worker(rank, world, ref_params):
    dims = ParallelDims(tp=2, pp=2, dp=2)
    config = ModelConfig(**CONFIG)
    parallel = ParallelConfig(tp=2, pp=2, sequence_parallel=True)
    chunks = build_model_chunks(config, dims, parallel=parallel)
    chunks = [
        DistributedDataParallel(c, dims, DDPConfig(bucket_size=2000, use_distributed_optimizer=True)) for c in chunks
    ]
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, clip_grad=0.0))
    loss_fn = build_loss_fn(unwrap(chunks[-1]))
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        batches = _batches(step, dims.dp)[dims.dp_rank]
        shape = (B, S // dims.tp, config.hidden_size)
        losses.append(forward_backward(chunks, batches, dims, loss_fn=loss_fn, hidden_shape=shape, dtype=torch.float32))
        assert opt.step().applied
    mismatches = []
    for c in chunks:
        for name, p, where in named_placements(c.module):
            for got, want in _local_view(p, where.shard, ref_params[name]):
                if not torch.allclose(got, want, rtol=1e-3, atol=5e-5):
                    mismatches.append((name, float((got - want).abs().max())))
    return losses, mismatches


@pytest.mark.slow
def test_llama_tp2_pp2_dp2_three_steps_match_one_process():
    config = ModelConfig(**CONFIG)
    model = reference_model(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=OPT["lr"],
        betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"], weight_decay=OPT["weight_decay"],
    )  # fmt: skip
    ref_losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = reference_loss(model, [b for rank_batches in _batches(step, 2) for b in rank_batches])
        ref_losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    ref_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    results = run_distributed(_worker, 8, ref_params, timeout=300)
    for rank, (losses, mismatches) in enumerate(results):
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"rank {rank}"
        assert not mismatches, f"rank {rank}: {mismatches}"
