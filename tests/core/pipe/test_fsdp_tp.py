"""FSDP2 composed with tensor parallelism: tp2 x fsdp2 (4 ranks) trains the real Transformer like one process.

Each rank's model is the tp-sharded Transformer (with and without sequence parallelism); `apply_fsdp2` then
shards every (tp-local) parameter over the dp group, and the placements recorded per module survive it. Two AdamW
steps later, each tp shard (gathered over dp) equals the matching slice of a one-process model trained on the
whole global batch. With sequence parallelism the norm gradients are summed over tp by `finalize_fsdp2_grads`.
"""

from __future__ import annotations

import pytest
import torch

from megalith.core import ModelConfig, ParallelConfig, ParallelDims, build_loss_fn, build_model_chunks
from megalith.core.distributed import apply_fsdp2
from megalith.core.distributed.fsdp import finalize_fsdp2_grads
from megalith.core.placement import named_placements
from tests.core.pipe.model import reference_model
from tests.harness import run_distributed

CONFIG = dict(
    family="llama", vocab_size=150, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
    ffn_hidden_size=48, max_seq_len=16, norm="rmsnorm", activation="swiglu", position_embedding="rope",
    bias=False, tie_embeddings=True, init_std=0.2,
)  # fmt: skip
B, S, DP, STEPS = 2, 16, 2, 2
# The sharded run sums in other orders than the one-process run (tp-split matmuls, gradients averaged over dp), so
# its gradients differ by rounding: measured about 1e-7 * max|grad| here; GRAD_NOISE bounds it with a 10x margin.
# AdamW's step lr * m / (sqrt(v) + eps) changes by at most lr / eps times a change of the gradient, so after STEPS
# steps the parameters may differ by STEPS * lr / eps * GRAD_NOISE (PARAM_ATOL, 1e-5). This needs eps well above
# the rounding noise: with the usual eps=1e-8 a gradient that cancels to noise (~1e-7) still moves its weight by
# about lr in whichever direction it rounded to, and the comparison then depends on which CPU kernel torch picks
# (it failed under ATEN_CPU_CAPABILITY=avx2 on torch 2.13 and 2.14). An eps near the gradients' size also keeps
# AdamW from hiding a wrongly scaled gradient (e.g. summed instead of averaged over dp).
OPT = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)  # torch.optim.AdamW on every rank
MAX_GRAD = 0.5  # the largest gradient entry of the one-process run is 0.46 (checked below)
GRAD_NOISE = 1e-6 * MAX_GRAD
PARAM_ATOL = STEPS * OPT["lr"] / OPT["eps"] * GRAD_NOISE


def _batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    ids = torch.randint(0, CONFIG["vocab_size"], (B, S), generator=gen)
    labels = torch.randint(0, CONFIG["vocab_size"], (B, S), generator=gen)
    labels[:, :3] = -100
    return ids, labels


def _loss(model, ids, labels) -> torch.Tensor:
    return build_loss_fn(model)(model(ids), labels).sum() / (labels != -100).sum()


def _optimizer(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **OPT)


def _worker(rank, world):
    dims = ParallelDims(tp=2, dp=DP)
    out = {}
    for sequence_parallel in (False, True):
        parallel = ParallelConfig(tp=2, sequence_parallel=sequence_parallel)
        (model,) = build_model_chunks(ModelConfig(**CONFIG), dims, parallel=parallel)
        before = {n: where for n, _, where in named_placements(model)}
        model = apply_fsdp2(model, dims)
        kept = {n: where for n, _, where in named_placements(model)} == before
        opt = _optimizer(model)
        losses = []
        for step in range(STEPS):
            opt.zero_grad()
            loss = _loss(model, *_batch(step, dims.dp_rank))
            loss.backward()
            finalize_fsdp2_grads(model, dims)
            opt.step()
            losses.append(float(loss.detach()))
        params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        specs = {n: where.shard for n, where in before.items()}
        sp_marked = sum(where.sequence_parallel for where in before.values())
        out[sequence_parallel] = (dims.tp_rank, losses, params, specs, kept, sp_marked)
    return out


def test_fsdp2_with_tensor_parallel_matches_one_process():
    model = reference_model(ModelConfig(**CONFIG))
    opt = _optimizer(model)
    ref_losses = []
    for step in range(STEPS):
        opt.zero_grad()
        losses = [_loss(model, *_batch(step, d)) for d in range(DP)]
        loss = sum(losses) / DP
        loss.backward()
        assert max(float(p.grad.abs().max()) for p in model.parameters()) <= MAX_GRAD  # PARAM_ATOL assumes it
        opt.step()
        ref_losses.append([float(x.detach()) for x in losses])
    ref = dict(model.named_parameters())
    results = run_distributed(_worker, 4, timeout=240)
    for rank, by_mode in enumerate(results):
        for sequence_parallel, (tp_rank, losses, params, specs, kept, sp_marked) in by_mode.items():
            where = f"rank {rank} sequence_parallel={sequence_parallel}"
            dp_rank = rank // 2  # rank = tp_rank + 2 * dp_rank
            assert tp_rank == rank % 2 and kept, where
            assert (sp_marked > 0) == sequence_parallel, where  # the norms are marked only with SP
            assert losses == pytest.approx([r[dp_rank] for r in ref_losses], rel=1e-5), where
            assert set(params) == set(ref)
            for name, got in params.items():
                spec = specs[name]
                if spec is None:
                    torch.testing.assert_close(got, ref[name].detach(), rtol=0, atol=PARAM_ATOL, msg=f"{where} {name}")
                    continue
                for local_start, length, global_start in spec.pieces:
                    torch.testing.assert_close(
                        got.narrow(spec.dim, local_start, length),
                        ref[name].detach().narrow(spec.dim, global_start, length),
                        rtol=0, atol=PARAM_ATOL, msg=f"{where} {name}",
                    )  # fmt: skip
