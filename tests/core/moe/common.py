"""Rank workers of the expert-parallel tests and the one-process computations they must reproduce.

Every layout trains the same small MoE model on the same global batches: data rank d (of ep * dp) reads
micro-batches d * m .. d * m + m - 1 of each step, the one-process reference reads all of them in that order.
Parameters and gradients come back from each rank as canonical tensors' pieces (`canonical_pieces` + ShardSpec),
and are assembled here, so nothing is compared in a layout-specific form.
"""

from __future__ import annotations

import math

import torch

from megalith.core import ModelConfig, ParallelConfig, ParallelDims, build_loss_fn, build_model_chunks
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
from megalith.core.distributed.ddp import grad_of
from megalith.core.loss import take_aux_losses
from megalith.core.moe.stats import finish_moe_step
from megalith.core.pipeline import forward_backward, unwrap
from megalith.core.placement import canonical_pieces, named_placements
from megalith.core.precision import PrecisionConfig, make_loss_scaler

VOCAB, HIDDEN, SEQ, MICRO_BATCH = 37, 16, 8, 2
OPT = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def moe_config(**overrides) -> ModelConfig:
    """Llama-style (RMSNorm, SwiGLU, RoPE, GQA), 4 layers, 6 experts (not a power of two), top-2, qk-norm,
    a shared expert with its gate; the large init std makes routing decisions and gradients sizeable."""
    base = dict(
        family="llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=4, num_attention_heads=4, num_kv_heads=2,
        ffn_hidden_size=24, max_seq_len=SEQ, norm="rmsnorm", activation="swiglu", position_embedding="rope",
        bias=False, tie_embeddings=False, init_std=0.3, qk_norm=True, num_experts=8, moe_top_k=2,
        moe_ffn_hidden_size=8, moe_shared_expert_ffn_hidden_size=8, moe_shared_expert_gate=True,
        moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.01,
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def make_batches(cfg: ModelConfig, num: int, seed: int) -> list[dict]:
    """Random tokens, a few ignored labels. The sequences of a micro-batch start with different tokens: equal
    prefixes would give equal hidden states, whose routing weights tie up to rounding at a capacity limit."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, cfg.max_seq_len), generator=gen)
        ids[:, 0] = torch.randperm(cfg.vocab_size, generator=gen)[:MICRO_BATCH]
        labels = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, cfg.max_seq_len), generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def step_batches(cfg: ModelConfig, step: int, m: int, data_ranks: int) -> list[list[dict]]:
    flat = make_batches(cfg, m * data_ranks, seed=500 + step)
    return [flat[d * m : (d + 1) * m] for d in range(data_ranks)]


def pieces(chunks, *, grads: bool = False) -> dict[str, tuple[torch.Tensor, object]]:
    """Canonical name -> (this rank's local piece of the parameter or of its gradient, ShardSpec)."""
    out = {}
    for chunk in chunks:
        for name, p, where in named_placements(unwrap(chunk)):
            t = grad_of(p) if grads else p.detach()
            if t is None:
                continue
            for canonical, view in canonical_pieces(name, t.detach().float(), where):
                out[canonical] = (view.clone(), where.shard)
    return out


def assemble(per_rank: list[dict], atol: float = 0.0) -> dict[str, torch.Tensor]:
    """Canonical tensors from every rank's pieces; replicas of an element must agree to `atol`."""
    full: dict[str, torch.Tensor] = {}
    for rank_pieces in per_rank:
        for name, (local, spec) in rank_pieces.items():
            shape = tuple(spec.global_shape) if spec is not None else tuple(local.shape)
            out = full.setdefault(name, torch.full(shape, float("nan")))
            views = [(local, out)] if spec is None else [
                (local.narrow(spec.dim, ls, n), out.narrow(spec.dim, gs, n)) for ls, n, gs in spec.pieces
            ]  # fmt: skip
            for src, dst in views:
                seen = ~torch.isnan(dst)
                if seen.any():
                    torch.testing.assert_close(src[seen], dst[seen], rtol=0, atol=atol, msg=f"replicas of {name}")
                dst.copy_(src)
    for name, t in full.items():
        assert not torch.isnan(t).any(), f"the ranks' pieces do not cover {name}"
    return full


def build(cfg, dims, parallel: ParallelConfig, *, zero=False, dtype=torch.float32, bucket_size=400, fp8=None):
    chunks = build_model_chunks(cfg, dims, parallel=parallel, dtype=dtype, seed=7, fp8=fp8)
    ddp = DDPConfig(bucket_size=bucket_size, use_distributed_optimizer=zero)
    return [DistributedDataParallel(c, dims, ddp) for c in chunks]


def train_worker(rank, world, cfg: ModelConfig, layout: dict, m: int, steps: int, *, zero=False, clip=0.0,
                 precision="fp32", grads_only=False, fp8=None, same_data=False):  # fmt: skip
    """`steps` AdamW steps in layout {tp, pp, ep, sequence_parallel, ...}; returns what the tests compare.
    `same_data`: every data rank reads data rank 0's micro-batches (the one-process run then reads them once)."""
    parallel = ParallelConfig(**layout)
    dims = ParallelDims.from_config(parallel, world)
    pcfg = PrecisionConfig(dtype=precision)
    chunks = build(cfg, dims, parallel, zero=zero, dtype=pcfg.param_dtype, fp8=fp8)
    scaler = make_loss_scaler(pcfg)
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, clip_grad=clip, fused=False), loss_scaler=scaler)
    seq = cfg.max_seq_len // (dims.tp if parallel.sequence_parallel else 1) // dims.cp
    losses, reports, norms, grads = [], [], [], None
    for step in range(steps):
        opt.zero_grad()
        ranks, rank = (1, 0) if same_data else (dims.data_parallel_size, dims.data_rank)
        batches = step_batches(cfg, step, m, ranks)[rank]
        losses.append(
            forward_backward(
                chunks,
                batches,
                dims,
                loss_fn=build_loss_fn(unwrap(chunks[-1])),
                hidden_shape=(MICRO_BATCH, seq, cfg.hidden_size),
                dtype=pcfg.param_dtype,
                loss_scale=scaler.scale,
            )
        )
        if step == 0:
            grads = pieces(chunks, grads=True)
        if grads_only:
            reports.append(finish_moe_step(chunks, dims, update_bias=False))
            break
        result = opt.step()
        norms.append(result.grad_norm)
        reports.append(finish_moe_step(chunks, dims, update_bias=result.applied))
    return {"losses": losses, "reports": reports, "norms": norms, "grads": grads, "params": pieces(chunks)}


def reference_step_loss(model, batches):
    """The one-process objective of one data rank's (or all of them) micro-batches: mean of (LM + aux)."""
    loss_fn = build_loss_fn(model)
    total, lm = 0.0, 0.0
    for b in batches:
        per_token = loss_fn(model(b["input_ids"]), b["labels"]).float()
        mb = per_token.sum() / (b["labels"] != -100).sum().clamp(min=1)
        aux = take_aux_losses(model)
        lm = lm + mb.detach()
        total = total + mb + (aux if aux is not None else 0.0)
    return total / len(batches), float(lm) / len(batches)


def reference_training(cfg: ModelConfig, m: int, data_ranks: int, steps: int, clip: float = 0.0, grads_only=False,
                       fp8=None):  # fmt: skip
    """One process, torch.optim.AdamW on the whole global batch, expert biases updated after each step."""
    (model,) = build_model_chunks(cfg, seed=7, fp8=fp8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2],
                                                          "weight_decay": 0.0}],
        lr=OPT["lr"], betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"], weight_decay=OPT["weight_decay"],
    )  # fmt: skip
    losses, reports, norms, grads = [], [], [], None
    for step in range(steps):
        opt.zero_grad()
        batches = [b for per_rank in step_batches(cfg, step, m, data_ranks) for b in per_rank]
        loss, lm = reference_step_loss(model, batches)
        loss.backward()
        losses.append(lm)
        if step == 0:
            grads = {n: g for n, (g, _) in pieces([model], grads=True).items()}
        if grads_only:
            reports.append(finish_moe_step([model], update_bias=False))
            break
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)))
        opt.step()
        reports.append(finish_moe_step([model]))
    params_out = {n: t for n, (t, _) in pieces([model]).items()}
    return {"losses": losses, "reports": reports, "norms": norms, "grads": grads, "params": params_out}
