"""megalith-train with mixture-of-experts models: resharding ep2 x tp2 checkpoints, a NaN router, MoE metrics."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from megalith.training.resilience import NonFiniteLossError
from megalith.training.trainer import Trainer
from tests.harness import run_distributed
from tests.training.loop_common import make_config, train_losses

MOE = (
    "model.preset=tiny-moe",
    "model.num_layers=4",
    "model.hidden_size=32",
    "model.moe_ffn_hidden_size=16",
    "model.moe_expert_bias=true",
    "model.moe_capacity_factor=1.5",
    "training.train_iters=2",
    "schedule.decay_style=constant",
)


def _fixed_batch(trainer):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, trainer.model_config.vocab_size, (2, 17), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _continue(trainer):
    """Evaluation, one more step on a fixed batch, evaluation again, and the expert biases after it."""
    before = trainer.evaluate()
    out = trainer.train_step([_fixed_batch(trainer) for _ in range(trainer.num_microbatches)])
    biases = {
        name: p.detach().clone()
        for chunk in trainer.chunks
        for name, p in chunk.module.named_parameters()
        if name.endswith("expert_bias")
    }
    return before, out.loss, trainer.evaluate(), biases, out.moe


def _save_at_ep2_tp2(rank, world_size, tmp):
    layout = ("parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true")
    _, trainer = train_losses(make_config(tmp, *MOE, *layout, f"checkpoint.save={tmp}/ck"))
    return _continue(trainer)


def _load_elsewhere(rank, world_size, tmp, ep, extra):
    cfg = make_config(f"{tmp}/ep{ep}", *MOE, f"parallel.ep={ep}", *extra, f"checkpoint.load={tmp}/ck")
    trainer = Trainer(cfg, stream=io.StringIO())
    assert trainer.step == 2
    return _continue(trainer)


def test_moe_checkpoint_from_ep2_tp2_loads_at_ep1_and_ep4(tmp_path):
    ref_eval, ref_loss, ref_after, ref_biases, ref_moe = run_distributed(_save_at_ep2_tp2, 4, str(tmp_path),
                                                                         timeout=600)[0]  # fmt: skip
    assert any(b.abs().max() > 0 for b in ref_biases.values()), "the expert biases must have moved"
    # ep1 alone, ep1 over two ZeRO-1 data ranks (flat optimizer shards), and ep4 (two experts per rank).
    for ep, world, extra in ((1, 1, []), (1, 2, ["ddp.use_distributed_optimizer=true"]), (4, 4, [])):
        ev, loss, after, biases, moe = run_distributed(_load_elsewhere, world, str(tmp_path), ep, extra,
                                                       timeout=600)[0]  # fmt: skip
        assert ev == pytest.approx(ref_eval, rel=1e-5), (ep, world)
        assert loss == pytest.approx(ref_loss, rel=1e-5), (ep, world)
        assert after == pytest.approx(ref_after, rel=1e-4), (ep, world)
        assert moe["moe_aux_loss"] == pytest.approx(ref_moe["moe_aux_loss"], rel=1e-5)
        for name, bias in ref_biases.items():
            torch.testing.assert_close(biases[name], bias, msg=name)


class _NaNRouter(Trainer):
    """Layer 0's router sees NaN inputs during the steps in `nan_steps`."""

    nan_steps: tuple[int, ...] = ()

    def train_step(self, batches):
        handles = []
        if self.step + 1 in self.nan_steps:
            for chunk in self.chunks:
                for key, layer in chunk.module.layers.items():
                    if key == "0":
                        hook = layer.mlp.router.register_forward_pre_hook(lambda mod, args: (args[0] * math.nan,))
                        handles.append(hook)
        try:
            return super().train_step(batches)
        finally:
            for handle in handles:
                handle.remove()


def _nan_router(rank, world_size, tmp, nan_steps):
    cfg = make_config(tmp, *MOE, "training.train_iters=5", "parallel.ep=2", "training.max_consecutive_nonfinite=2")
    trainer = _NaNRouter(cfg, stream=io.StringIO())
    trainer.nan_steps = nan_steps
    try:
        trainer.fit()
        error = None
    except NonFiniteLossError as exc:
        error = str(exc)
    trainer.close()
    return [h["applied"] for h in trainer.history if "applied" in h], trainer.skipped_steps, error


def test_a_router_producing_nan_skips_the_step_and_repeated_nans_stop(tmp_path):
    applied, skipped, error = run_distributed(_nan_router, 2, str(tmp_path / "a"), (3,), timeout=600)[0]
    assert applied == [True, True, False, True, True] and skipped == 1 and error is None
    records = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1
    applied, _, error = run_distributed(_nan_router, 2, str(tmp_path / "b"), (3, 4), timeout=600)[0]
    assert applied == [True, True, False] and "2 non-finite losses in a row" in error


def _metrics_run(rank, world_size, tmp):
    cfg = make_config(tmp, *MOE, "parallel.ep=2")
    out = io.StringIO()
    trainer = Trainer(cfg, stream=out)
    trainer.fit()
    trainer.close()
    return out.getvalue()


def test_metrics_report_aux_losses_load_per_layer_and_dropped_tokens(tmp_path):
    console = run_distributed(_metrics_run, 2, str(tmp_path), timeout=600)[0]
    assert "M active; 8 experts, top 2, in 4 layers" in console and "(ep 2 x dp 1)" in console
    assert "| aux " in console and "| z-loss " in console and "| load cv " in console and "| dropped " in console
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for layer in range(4):
        low, high, cv = (last[f"moe_load_{k}/layer{layer}"] for k in ("min", "max", "cv"))
        assert 0 <= low <= high and cv >= 0
    assert last["moe_aux_loss"] > 0 and last["moe_z_loss"] > 0
    assert 0 <= last["moe_dropped_fraction"] < 1
    assert last["moe_load_cv_max"] == max(last[f"moe_load_cv/layer{i}"] for i in range(4))


def _fp8_run(rank, world_size, tmp):
    cfg = make_config(tmp, *MOE, "parallel.ep=2", "fp8.recipe=rowwise", "precision.dtype=bf16")
    trainer = Trainer(cfg, stream=io.StringIO())
    experts = [type(m).__name__ for c in trainer.chunks for m in c.module.modules() if hasattr(m, "fp8_casts")]
    trainer.fit()
    trainer.close()
    return experts


def test_moe_trains_with_fp8_experts_under_expert_parallelism(tmp_path):
    experts = run_distributed(_fp8_run, 2, str(tmp_path), timeout=600)[0]
    assert experts.count("Fp8GroupedExperts") == 4
    last = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(last["loss"]) and 0 <= last["fp8_saturated"] < 1e-3 and "fp8_grad_underflow" in last
    with pytest.raises(ValueError, match=r"fp8\.recipe=delayed is not supported for the routed experts"):
        Trainer(make_config(tmp_path / "delayed", *MOE, "fp8.recipe=delayed"), stream=io.StringIO())


def _losses_run(rank, world_size, tmp, name, *extra):
    losses, _ = train_losses(make_config(f"{tmp}/{name}", *MOE, "model.moe_capacity_factor=null", *extra))
    return [loss for _, loss in losses]


def test_moe_trains_under_context_parallelism_like_one_process(tmp_path):
    """megalith-train with a mixture-of-experts model at cp2 (each rank half of every sequence) repeats the cp1
    loss curve: the routers' load-balancing losses see the whole sequences' token counts."""
    (cp1,) = run_distributed(_losses_run, 1, str(tmp_path), "cp1", timeout=600)
    for losses in run_distributed(_losses_run, 2, str(tmp_path), "cp2", "parallel.cp=2", timeout=600):
        assert losses == pytest.approx(cp1, rel=1e-5)


def test_moe_trains_with_pipeline_and_expert_parallelism_like_one_process(tmp_path):
    """megalith-train at pp2 x ep2 (interleaved stages, ZeRO-1) repeats the one-process loss curve."""
    (alone,) = run_distributed(_losses_run, 1, str(tmp_path), "alone", timeout=600)
    layout = ("parallel.pp=2", "parallel.ep=2", "parallel.virtual_stages=2", "ddp.use_distributed_optimizer=true")
    results = run_distributed(_losses_run, 4, str(tmp_path), "pp2ep2", *layout, timeout=600)
    for losses in results[2:]:  # the last pipeline stage's ranks hold the loss
        assert losses == pytest.approx(alone, rel=1e-5)
