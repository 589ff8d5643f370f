"""Rank workers shared by the pipeline / data-parallel tests, and the one-process references they match."""

from __future__ import annotations

import torch

from megalith.core import ModelConfig, ParallelConfig, ParallelDims, build_loss_fn, build_model_chunks
from megalith.core.distributed import AdamW, DDPConfig, DistributedDataParallel, OptimizerConfig
from megalith.core.distributed.ddp import grad_of
from megalith.core.pipeline import forward_backward, unwrap
from megalith.core.precision import PrecisionConfig, make_loss_scaler
from tests.core.pipe.model import make_batches, reference_loss, reference_model

MICRO_BATCH = 2
OPT = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def step_batches(cfg: ModelConfig, step: int, num_microbatches: int, dp: int) -> list[list[dict]]:
    """The global batch of one step, split per dp rank (rank d gets micro-batches d*m .. d*m + m - 1)."""
    flat = make_batches(cfg, num_microbatches * dp, MICRO_BATCH, seed=1000 + step)
    return [flat[d * num_microbatches : (d + 1) * num_microbatches] for d in range(dp)]


def build(cfg: ModelConfig, dims, *, vp=1, layers_per_stage=None, ddp_config=None, dtype=torch.float32):
    parallel = ParallelConfig(pp=dims.pp, virtual_stages=vp, layers_per_stage=layers_per_stage)
    chunks = build_model_chunks(cfg, dims, parallel=parallel, dtype=dtype)
    return [DistributedDataParallel(c, dims, ddp_config or DDPConfig(bucket_size=300)) for c in chunks]


def loss_fn(chunks):
    return build_loss_fn(unwrap(chunks[-1]))


def named(chunks, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient: the DDP buffer's fp32 main_grad, or autograd's when there is none)."""
    out = {}
    for c in chunks:
        for name, p in c.module.named_parameters():
            t = grad_of(p) if grads else p
            out[name] = t.detach().float().clone()
    return out


def grads_worker(rank, world, cfg: ModelConfig, pp: int, vp: int, m: int, layers_per_stage=None):
    """One forward/backward of a pipeline (dp = world // pp): returns the loss and every main_grad."""
    dims = ParallelDims(pp=pp, dp=world // pp)
    chunks = build(cfg, dims, vp=vp, layers_per_stage=layers_per_stage)
    batches = step_batches(cfg, 0, m, dims.dp)[dims.dp_rank]
    loss = forward_backward(
        chunks, batches, dims, loss_fn=loss_fn(chunks), hidden_shape=(MICRO_BATCH, cfg.max_seq_len, cfg.hidden_size),
        dtype=torch.float32,
    )  # fmt: skip
    return loss, named(chunks, grads=True)


def train_worker(
    rank,
    world,
    cfg: ModelConfig,
    pp: int,
    m: int,
    steps: int,
    *,
    vp=1,
    zero=False,
    clip=None,
    precision="fp32",
    inject_inf_step=None,
    initial_scale=2.0**16,
    bucket_size=300,
    overlap=True,
    fused=False,
):
    """`steps` AdamW steps; returns losses, step results, final parameters and optimizer state bytes."""
    dims = ParallelDims(pp=pp, dp=world // pp)
    pcfg = PrecisionConfig(dtype=precision, initial_loss_scale=initial_scale, hysteresis=1)
    chunks = build(
        cfg,
        dims,
        vp=vp,
        ddp_config=DDPConfig(bucket_size=bucket_size, use_distributed_optimizer=zero, overlap_grad_reduce=overlap),
        dtype=pcfg.param_dtype,
    )
    scaler = make_loss_scaler(pcfg)
    opt = AdamW(chunks, dims, OptimizerConfig(**OPT, clip_grad=clip or 0.0, fused=fused), loss_scaler=scaler)
    losses, results, scales, history = [], [], [], []
    for step in range(steps):
        opt.zero_grad()
        batches = step_batches(cfg, step, m, dims.dp)[dims.dp_rank]
        scales.append(scaler.scale)
        losses.append(
            forward_backward(
                chunks,
                batches,
                dims,
                loss_fn=loss_fn(chunks),
                dtype=pcfg.param_dtype,
                loss_scale=scaler.scale,
                hidden_shape=(MICRO_BATCH, cfg.max_seq_len, cfg.hidden_size),
            )
        )
        if step == inject_inf_step and dims.dp_rank == dims.dp - 1 and dims.pp_rank == 0:
            grad = opt.pieces[0].master.grad if opt.sharded else grad_of(opt.pieces[0].param)
            grad.view(-1)[0] = float("inf")  # one rank's (reduced) gradient overflows
        results.append(opt.step())
        history.append(named(chunks))
    # The buffer range each rank's optimizer owns (ZeRO-1 shards), and the elements it keeps Adam state for.
    shards = [(r.lo, r.hi) for r in opt.shards]
    owned_numel = sum(r.hi - r.lo for r in opt.shards) if zero else sum(p.length for p in opt.pieces)
    dtypes = {
        "params": {str(p.dtype) for c in chunks for p in c.module.parameters()},
        "main_grads": {str(grad_of(p).dtype) for c in chunks for p in c.module.parameters()},
        "masters": {str(p.master.dtype) for p in opt.pieces},
    }
    # Under ZeRO-1 the parameters in the owned shards are exactly the fp32 masters rounded to the param dtype.
    rounded = not zero or all(
        torch.equal(r.ddp.param_buffer[r.lo : r.hi], r.master.to(pcfg.param_dtype)) for r in opt.shards
    )
    # Which elements of each parameter this rank's optimizer owns, and whether its master copy equals them.
    owned = [
        (
            name,
            start,
            length,
            bool(torch.equal(state["master"], p.detach().float().reshape(-1)[start : start + length])),
        )
        for name, p, start, length, state in opt.param_segments()
    ]
    return {
        "owned": owned,
        "losses": losses,
        "results": results,
        "scales": scales,
        "params": named(chunks),
        "shards": shards,
        "owned_numel": owned_numel,
        "state_numel": sum(p.length for p in opt.pieces),
        "masters_are_params": all(p.master is p.param for p in opt.pieces),
        "history": history,
        "dtypes": dtypes,
        "rounded": rounded,
        "state_bytes": opt.state_bytes(),
        "buffer_numel": sum(c.grad_buffer.numel() if c.grad_buffer is not None else 0 for c in chunks),
    }


def reference_grads(cfg: ModelConfig, m: int, dp: int):
    model = reference_model(cfg)
    batches = [b for rank_batches in step_batches(cfg, 0, m, dp) for b in rank_batches]
    loss = reference_loss(model, batches)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def reference_training(cfg: ModelConfig, m: int, dp: int, steps: int, clip=None, skip_steps=()):
    """One-process AdamW on the full global batch (torch.optim.AdamW, decay off for 1-D parameters)."""
    model = reference_model(cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=OPT["lr"],
        betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"], weight_decay=OPT["weight_decay"],
    )  # fmt: skip
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad()
        batches = [b for rank_batches in step_batches(cfg, step, m, dp) for b in rank_batches]
        loss = reference_loss(model, batches)
        losses.append(float(loss.detach()))
        if step in skip_steps:
            norms.append(float("nan"))
            continue
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))))
        opt.step()
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}
