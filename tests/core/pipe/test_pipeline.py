"""Pipeline stages and schedules (1F1B, interleaved) against the same model in one process."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megalith.core import ParallelDims
from megalith.core.pipeline import forward_backward, schedule_order, split_layers
from tests.core.pipe.common import MICRO_BATCH, build, grads_worker, loss_fn, reference_grads, step_batches
from tests.core.pipe.model import tiny_config
from tests.harness import run_distributed


@pytest.mark.parametrize("pp,vp,m", [(1, 1, 3), (2, 1, 3), (4, 1, 6), (2, 2, 4), (4, 2, 8)])
def test_schedule_order_runs_every_pass_once_forward_first(pp, vp, m):
    for rank in range(pp):
        order = schedule_order(pp, rank, m, vp)
        assert Counter((a.kind, a.chunk, a.mb) for a in order) == Counter(
            (k, c, i) for k in "FB" for c in range(vp) for i in range(m)
        )
        seen_forward = set()
        for a in order:
            if a.kind == "F":
                seen_forward.add((a.chunk, a.mb))
            else:
                assert (a.chunk, a.mb) in seen_forward
        # In-flight micro-batches never exceed the warmup depth: 1F1B bounds activation memory by pp, not m.
        live = peak = 0
        for a in order:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        assert peak <= min(vp * m, (pp - rank - 1) * 2 + (vp - 1) * pp + 1 if vp > 1 else pp - rank)


def test_schedule_validation_messages():
    with pytest.raises(ValueError, match=r"micro-batches \(6\) to be a multiple of pp \(4\)"):
        schedule_order(4, 0, 6, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        schedule_order(2, 0, 0)
    with pytest.raises(ValueError, match=r"num_layers \(6\) is not divisible"):
        split_layers(6, 4)
    with pytest.raises(ValueError, match="summing to num_layers"):
        split_layers(6, 2, [2, 3])
    assert split_layers(6, 3, [1, 3, 2]) == [[0], [1, 2, 3], [4, 5]]


@pytest.mark.parametrize(
    "pp,vp,m,tied,layers_per_stage",
    [
        (2, 1, 3, True, None),  # 1F1B, m not a multiple of pp, tied embedding across first/last stage
        (2, 1, 4, False, [1, 3]),  # uneven explicit split
        (4, 1, 5, False, None),
        (2, 2, 4, False, None),  # interleaved, 2 virtual stages
        (4, 2, 4, True, None),  # interleaved over 4 ranks, tied
    ],
)
def test_pipeline_loss_and_grads_match_one_process(pp, vp, m, tied, layers_per_stage):
    cfg = tiny_config(num_layers=pp * vp * (2 if pp == 2 else 1), tie_embeddings=tied)
    results = run_distributed(grads_worker, pp, cfg, pp, vp, m, layers_per_stage, timeout=120)
    ref_loss, ref_grads = reference_grads(cfg, m, dp=1)
    seen = set()
    for rank, (loss, grads) in enumerate(results):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank}"
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
            seen.add(name)
    assert seen == set(ref_grads), "every parameter of the model is held by some stage"
    if tied:
        assert "embed.weight" in results[-1][1] and "output.weight" not in results[-1][1]


def _release_worker(rank, world, release: bool):
    cfg = tiny_config(num_layers=4)
    dims = ParallelDims(pp=world)
    chunks = build(cfg, dims)
    outputs = []
    last_layer = chunks[0].module.layers[max(chunks[0].module.layers.keys(), key=int)]
    last_layer.register_forward_hook(lambda module, args, out: outputs.append(out))
    batches = step_batches(cfg, 0, 3, 1)[0]
    loss = forward_backward(chunks, batches, dims, loss_fn=loss_fn(chunks), hidden_shape=(MICRO_BATCH, 8, 16),
                            dtype=torch.float32, release_outputs=release)  # fmt: skip
    return loss, [tuple(o.shape) for o in outputs]


def test_sent_activations_are_released_and_backward_still_works():
    released = run_distributed(_release_worker, 2, True, timeout=120)
    kept = run_distributed(_release_worker, 2, False, timeout=120)
    assert released[0][1] == [(1,)] * 3, "stage 0 freed each activation it sent"
    assert kept[0][1] == [(2, 8, 16)] * 3
    assert released[1][1] == kept[1][1] == [(2, 8, 16)] * 3, "the last stage sends no activations"
    assert released[0][0] == kept[0][0]


def _eval_worker(rank, world, cfg):
    dims = ParallelDims(pp=world)
    chunks = build(cfg, dims, vp=2)
    batches = step_batches(cfg, 0, 4, 1)[0]
    loss = forward_backward(chunks, batches, dims, loss_fn=loss_fn(chunks), hidden_shape=(MICRO_BATCH, 8, 16),
                            dtype=torch.float32, forward_only=True)  # fmt: skip
    return loss, all(p.grad is None for c in chunks for p in c.module.parameters())  # fp32, dp 1: autograd's grads


def test_forward_only_interleaved_gives_the_loss_and_no_gradients():
    cfg = tiny_config(num_layers=4)
    ref_loss, _ = reference_grads(cfg, 4, dp=1)
    for loss, no_grads in run_distributed(_eval_worker, 2, cfg, timeout=120):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert no_grads
