"""DDP, the distributed optimizer (ZeRO-1), pp x dp, fp16 loss scaling and clipping against one process."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megalith.core.distributed import AdamW, OptimizerConfig
from megalith.core.pipeline import forward_backward
from tests.core.pipe.common import OPT, build, loss_fn, reference_training, step_batches, train_worker
from tests.core.pipe.model import tiny_config
from tests.harness import run_distributed

STEPS = 3
OPT_LR = OPT["lr"]


def _check_params(results, ref_params, atol=2e-5):
    seen = set()
    for rank, out in enumerate(results):
        for name, value in out["params"].items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=atol, msg=f"rank {rank} {name}")
            seen.add(name)
    assert seen == set(ref_params)


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("zero", [False, True])
def test_data_parallel_adamw_matches_one_process(dp, zero):
    cfg = tiny_config(num_layers=2)
    m = 2
    results = run_distributed(train_worker, dp, cfg, 1, m, STEPS, zero=zero, timeout=120)
    ref_losses, _, ref_params = reference_training(cfg, m, dp, STEPS)
    for out in results:
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert all(r.applied for r in out["results"])
    _check_params(results, ref_params)
    # The optimizer owns 1/dp of the (padded) gradient buffer with ZeRO-1, all of it otherwise. Parameters are
    # fp32, so they are their own masters: the state is the two Adam moments alone (8 bytes per element).
    for out in results:
        assert out["owned_numel"] * (dp if zero else 1) == out["buffer_numel"]
        assert out["state_bytes"] == 8 * out["state_numel"]
        assert out["masters_are_params"] == (not zero)
    # param_segments: over the dp ranks every element of every parameter is owned exactly once (ZeRO-1) or
    # by every rank (replicated), and the fp32 master equals the parameter.
    for name, ref in ref_params.items():
        counts = torch.zeros(ref.numel())
        for out in results:
            for seg_name, start, length, master_matches in out["owned"]:
                if seg_name == name:
                    counts[start : start + length] += 1
                    assert master_matches, name
        assert bool((counts == (1 if zero else dp)).all()), name
    if zero:
        ranges = sorted(shard for out in results for shard in out["shards"])
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges)), "shards are disjoint"


@pytest.mark.parametrize("zero", [False, True])
def test_fused_adamw_matches_one_process(zero):
    """torch's fused AdamW kernel (CPU here, CUDA on a GPU) under the flat fp32 buffers, sharded or not."""
    cfg = tiny_config(num_layers=2)
    results = run_distributed(train_worker, 2, cfg, 1, 2, STEPS, zero=zero, clip=0.05, fused=True, timeout=120)
    ref_losses, _, ref_params = reference_training(cfg, 2, 2, STEPS, clip=0.05)
    for out in results:
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5)
    _check_params(results, ref_params)


def test_pipeline_times_data_parallel_with_zero_and_clipping():
    # pp2 x dp2, tied embeddings across the first and last stage, clipping active (threshold below the norm).
    cfg = tiny_config(num_layers=4, tie_embeddings=True)
    m, clip = 3, 0.5
    results = run_distributed(train_worker, 4, cfg, 2, m, STEPS, zero=True, clip=clip, timeout=120)
    ref_losses, ref_norms, ref_params = reference_training(cfg, m, 2, STEPS, clip=clip)
    assert min(ref_norms) > clip, "the test must exercise clipping"
    for out in results:
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert [r.grad_norm for r in out["results"]] == pytest.approx(ref_norms, rel=1e-5)
    _check_params(results, ref_params)


def test_interleaved_pipeline_times_data_parallel():
    cfg = tiny_config(num_layers=4)
    m = 2
    results = run_distributed(train_worker, 4, cfg, 2, m, 2, vp=2, clip=1e9, timeout=120)
    ref_losses, ref_norms, ref_params = reference_training(cfg, m, 2, 2)
    for out in results:
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert [r.grad_norm for r in out["results"]] == pytest.approx(ref_norms, rel=1e-5)
    _check_params(results, ref_params)


def test_fp16_overflow_skips_exactly_that_step_and_lowers_the_scale():
    cfg = tiny_config(num_layers=2)
    m, steps, bad = 2, 4, 1
    results = run_distributed(
        train_worker, 2, cfg, 1, m, steps, zero=True, precision="fp16", inject_inf_step=bad, timeout=120
    )
    fp32 = run_distributed(train_worker, 2, cfg, 1, m, steps, zero=True, inject_inf_step=bad, timeout=120)
    for out in results:
        assert [r.applied for r in out["results"]] == [s != bad for s in range(steps)]
        assert out["scales"][bad + 1] == out["scales"][bad] / 2, "the overflow halves the scale (hysteresis 1)"
        assert out["scales"][bad] == out["scales"][0] == 2.0**16
        assert math.isnan(out["results"][bad].grad_norm)
        assert all(math.isfinite(loss) for loss in out["losses"])
        # The skipped step left every parameter bit-for-bit unchanged; the next steps updated them again.
        for name, before in out["history"][bad - 1].items():
            assert torch.equal(out["history"][bad][name], before), name
        assert any(not torch.equal(out["history"][bad + 1][n], v) for n, v in out["history"][bad].items())
        # fp16 training continued like the fp32 run that skipped the same step.
        assert out["losses"] == pytest.approx(fp32[0]["losses"], rel=2e-2)
    # The fp32 run with the same injection equals one-process AdamW that simply skips that step.
    ref_losses, _, ref_params = reference_training(cfg, m, 2, steps, skip_steps={bad})
    assert fp32[0]["losses"] == pytest.approx(ref_losses, rel=1e-5)
    _check_params(fp32, ref_params)


def test_bf16_keeps_fp32_main_grads_and_masters_and_tracks_fp32():
    cfg = tiny_config(num_layers=2)
    results = run_distributed(train_worker, 2, cfg, 1, 2, STEPS, zero=True, precision="bf16", timeout=120)
    ref_losses, _, ref_params = reference_training(cfg, 2, 2, STEPS)
    for out in results:
        assert out["dtypes"] == {
            "params": {"torch.bfloat16"},
            "main_grads": {"torch.float32"},
            "masters": {"torch.float32"},
        }
        assert out["rounded"], "bf16 parameters are the fp32 masters rounded"
        assert out["losses"] == pytest.approx(ref_losses, rel=1e-2)
        # Adam moves each element by about lr per step, so bf16 noise can flip a tiny gradient's update; on
        # average the bf16 run stays far closer to the fp32 one than a single step's movement.
        diffs = torch.cat([(v - ref_params[n]).abs().reshape(-1) for n, v in out["params"].items()])
        assert diffs.mean() < 0.25 * OPT_LR * STEPS, float(diffs.mean())


def test_one_process_fp32_keeps_no_buffers_no_masters_and_matches_torch():
    """dp = 1 with fp32 parameters: no gradient buffer, no hooks, no fp32 master copy, autograd's own gradients;
    the fused update is torch's AdamW's, so three steps equal the plain torch loop."""
    from megalith.core import ParallelDims

    cfg = tiny_config(num_layers=2)
    dims = ParallelDims()
    (ddp,) = build(cfg, dims)
    assert ddp.native and ddp.grad_buffer is None and not ddp._hooks
    opt = AdamW([ddp], dims, OptimizerConfig(**OPT, clip_grad=0.5))
    assert all(p.master is p.param for p in opt.pieces)
    assert opt.state_bytes() == 8 * sum(p.numel() for p in ddp.module.parameters())
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        batches = step_batches(cfg, step, 2, 1)[0]
        losses.append(forward_backward([ddp], batches, dims, loss_fn=loss_fn([ddp]), hidden_shape=(2, 8, 16),
                                       dtype=torch.float32))  # fmt: skip
        assert opt.step().applied
    ref_losses, _, ref_params = reference_training(cfg, 2, 1, STEPS, clip=0.5)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, p in ddp.module.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], rtol=1e-4, atol=2e-5, msg=name)
