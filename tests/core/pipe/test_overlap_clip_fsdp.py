"""Bucket overlap (communication only in the last micro-batch's backward), global-norm clipping over tp x pp,
FSDP2 mode and the loss-scaler rules."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.module_tracker import ModuleTracker

from megalith.core import ParallelDims
from megalith.core.distributed import DDPConfig
from megalith.core.grad_clip import clip_grad_norm_
from megalith.core.pipeline import finalize_grads, forward_backward
from megalith.core.placement import set_placement
from megalith.core.precision import DynamicLossScaler, PrecisionConfig
from tests.core.pipe.common import MICRO_BATCH, OPT, build, loss_fn, reference_training, step_batches
from tests.core.pipe.model import reference_loss, reference_model, tiny_config
from tests.harness import run_distributed


def _overlap_worker(rank, world, zero: bool, m: int):
    cfg = tiny_config(num_layers=2)
    dims = ParallelDims(dp=world)
    (ddp,) = build(cfg, dims, ddp_config=DDPConfig(bucket_size=300, use_distributed_optimizer=zero))
    forwards = []
    ddp.module.layers["0"].register_forward_pre_hook(lambda *_: forwards.append(1))
    calls = []
    lo, hi = ddp.grad_buffer.data_ptr(), ddp.grad_buffer.data_ptr() + 4 * ddp.grad_buffer.numel()

    def counting(real, input_index):
        def wrapper(*args, **kwargs):
            t = args[input_index]
            if lo <= t.data_ptr() < hi:  # a gradient-bucket collective (not the loss reduction)
                calls.append((len(forwards), ModuleTracker().is_bw))  # is_bw: an autograd backward is running
            return real(*args, **kwargs)

        return wrapper

    name = "reduce_scatter_single" if zero and hasattr(dist, "reduce_scatter_single") else "all_reduce"
    if zero and name == "all_reduce":
        name = "reduce_scatter_tensor"
    real = getattr(dist, name)
    setattr(dist, name, counting(real, 1 if zero else 0))
    try:
        batches = step_batches(cfg, 0, m, dims.dp)[dims.dp_rank]
        forward_backward([ddp], batches, dims, loss_fn=loss_fn([ddp]), hidden_shape=(MICRO_BATCH, 8, 16),
                         dtype=torch.float32)  # fmt: skip
    finally:
        setattr(dist, name, real)
    return calls, len(ddp.buckets)


@pytest.mark.parametrize("zero", [False, True])
def test_bucket_collectives_run_during_the_last_microbatch_backward(zero):
    m = 3
    for calls, num_buckets in run_distributed(_overlap_worker, 2, zero, m, timeout=120):
        assert num_buckets > 3, "the test needs several buckets"
        assert len(calls) == num_buckets, "one collective per bucket per step"
        assert all(f == m for f, _ in calls), f"collectives only after the last micro-batch's forward: {calls}"
        assert all(in_backward for _, in_backward in calls), "launched while backward was still running"


def _clip_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # stage -> name -> (full grad, tp-sharded?)
    return {
        stage: {
            "w": (torch.randn(8, 4, generator=gen), True),  # column-parallel weight: rows split over tp
            "norm": (torch.randn(4, generator=gen), False),  # replicated over tp
        }
        for stage in range(2)
    } | {"embed": torch.randn(6, 4, generator=gen)}


def _clip_worker(rank, world, max_norm):
    dims = ParallelDims(tp=2, pp=2)
    full = _clip_grads()
    module = torch.nn.Module()
    for name, (grad, sharded) in full[dims.pp_rank].items():
        local = grad.chunk(2)[dims.tp_rank].clone() if sharded else grad.clone()
        setattr(module, name, torch.nn.Parameter(torch.zeros_like(local)))
        getattr(module, name).grad = local
        set_placement(module, name, tp_sharded=sharded)
    # The tied embedding: a vocab-sharded copy on the first and on the last stage, same (summed) gradient.
    module.embed = torch.nn.Parameter(torch.zeros(3, 4))
    module.embed.grad = full["embed"].chunk(2)[dims.tp_rank].clone()
    set_placement(module, "embed", tp_sharded=True, shared_embedding=True)
    norm = clip_grad_norm_([module], max_norm, dims)
    return float(norm), [getattr(module, n).grad.clone() for n in (*full[dims.pp_rank], "embed")]


def test_clip_grad_norm_counts_every_element_once_over_tp_and_pp():
    full = _clip_grads()
    unique = [g for stage in range(2) for g, _ in full[stage].values()] + [full["embed"]]
    expected = torch.cat([g.reshape(-1) for g in unique]).double().norm().item()
    max_norm = expected / 3
    results = run_distributed(_clip_worker, 4, max_norm, timeout=120)
    for rank, (norm, grads) in enumerate(results):
        assert norm == pytest.approx(expected, rel=1e-6)
        pp_rank, tp_rank = rank // 2, rank % 2
        originals = [g.chunk(2)[tp_rank] if sh else g for g, sh in full[pp_rank].values()]
        originals.append(full["embed"].chunk(2)[tp_rank])
        for got, orig in zip(grads, originals, strict=True):
            torch.testing.assert_close(got, orig * (max_norm / (expected + 1e-6)))


def _fsdp_worker(rank, world, cfg, m, steps, clip=None):
    from megalith.core.distributed import apply_fsdp2

    dims = ParallelDims(dp=world)
    model = apply_fsdp2(reference_model(cfg), dims)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=OPT["lr"],
        betas=(OPT["beta1"], OPT["beta2"]), eps=OPT["eps"], weight_decay=OPT["weight_decay"],
    )  # fmt: skip
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = reference_loss(model, step_batches(cfg, step, m, world)[dims.dp_rank])
        loss.backward()
        if clip is not None:
            norms.append(float(clip_grad_norm_([model], clip, dims)))
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}, norms


def test_fsdp2_matches_one_process():
    cfg = tiny_config(num_layers=2)
    m, steps = 2, 2
    results = run_distributed(_fsdp_worker, 2, cfg, m, steps, timeout=120)
    ref_losses, _, ref_params = reference_training(cfg, m, 2, steps)
    mean_losses = [sum(r[0][s] for r in results) / 2 for s in range(steps)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-5)
    for _, params, _ in results:
        assert set(params) == set(ref_params)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_clip_grad_norm_matches_one_process(world):
    """Clipping FSDP2's dp-sharded DTensor gradients: the same norm and the same update as torch's clip in one
    process (3 ranks shard some parameters unevenly)."""
    cfg = tiny_config(num_layers=2)
    m, steps = 2, 2
    _, ref_norms, ref_params = reference_training(cfg, m, world, steps)  # the unclipped norms, to pick the bound
    clip = min(ref_norms) / 4  # clips every step
    results = run_distributed(_fsdp_worker, world, cfg, m, steps, clip, timeout=120)
    ref_losses, ref_norms, ref_params = reference_training(cfg, m, world, steps, clip=clip)
    mean_losses = [sum(r[0][s] for r in results) / world for s in range(steps)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-5)
    for _, params, norms in results:
        assert norms == pytest.approx(ref_norms, rel=1e-5)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=2e-5, msg=name)


def test_dynamic_loss_scaler_hysteresis_growth_and_floor():
    cfg = PrecisionConfig(dtype="fp16", initial_loss_scale=8.0, min_loss_scale=2.0, loss_scale_window=3, hysteresis=2)
    s = DynamicLossScaler(cfg)
    s.update(True)
    assert s.scale == 8.0, "the first overflow is absorbed by hysteresis"
    s.update(True)
    assert s.scale == 4.0
    s.update(True)
    assert s.scale == 2.0
    s.update(True)
    assert s.scale == 2.0, "never below min_loss_scale"
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0
    s.update(False)
    assert s.scale == 4.0, "grows after loss_scale_window clean steps"
    s.update(True)
    assert s.scale == 4.0, "growth restored the hysteresis budget"
    state = s.state_dict()
    t = DynamicLossScaler(cfg)
    t.load_state_dict(state)
    assert t.state_dict() == state


def test_precision_config_errors_name_the_field():
    with pytest.raises(ValueError, match="dtype must be one of"):
        PrecisionConfig(dtype="fp8")
    with pytest.raises(ValueError, match=r"min_loss_scale \(4.0\)"):
        PrecisionConfig(dtype="fp16", initial_loss_scale=2.0, min_loss_scale=4.0)
    with pytest.raises(ValueError, match=r"bucket_size must be a positive element count or None, got 0"):
        DDPConfig(bucket_size=0)


def _sequence_parallel_worker(rank, world):
    from megalith.core.distributed import DistributedDataParallel

    dims = ParallelDims(tp=2, dp=2)
    model = torch.nn.Linear(3, 2)
    set_placement(model, "weight", tp_sharded=True)  # stays per-rank
    set_placement(model, "bias", sequence_parallel=True)  # replicated, each tp rank saw half the sequence
    ddp = DistributedDataParallel(model, dims)
    x = torch.full((4, 3), float(rank + 1))
    ddp(x).sum().backward()
    finalize_grads([ddp], dims)
    return model.weight.main_grad.clone(), model.bias.main_grad.clone()


def test_sequence_parallel_grads_are_summed_over_tp_and_averaged_over_dp():
    results = run_distributed(_sequence_parallel_worker, 4, timeout=120)
    # rank = tp_rank + 2 * dp_rank; each rank's weight grad is 4 * (rank + 1) per element, its bias grad 4.
    for rank, (w, b) in enumerate(results):
        tp_rank = rank % 2
        w_expected = sum(4.0 * (tp_rank + 2 * d + 1) for d in range(2)) / 2
        torch.testing.assert_close(w, torch.full((2, 3), w_expected))
        torch.testing.assert_close(b, torch.full((2,), 4.0 * 2))


def _replicated_dtensor_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dims = ParallelDims(dp=world)
    mesh = init_device_mesh("cpu", (world,))
    module = torch.nn.Linear(3, 4, bias=False)
    module.weight.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
    try:
        clip_grad_norm_([module], 1.0, dims)
    except ValueError as exc:
        return str(exc)
    return None


def test_clip_grad_norm_rejects_dtensor_gradients_not_sharded_over_dp():
    for message in run_distributed(_replicated_dtensor_worker, 2, timeout=60):
        assert message is not None and "(4, 3)" in message and "Replicate" in message
