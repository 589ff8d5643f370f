"""The training loop on gloo: exact resume after a crash at several layouts, resharding, SIGTERM, NaN, model-only."""

from __future__ import annotations

import io
import json
import math
import os
import signal

import pytest
import torch

from megalith.core import build_loss_fn
from megalith.core.checkpoint import list_checkpoints, write_model_checkpoint
from megalith.training.resilience import NonFiniteLossError
from megalith.training.trainer import Trainer
from tests.core.parallel_checks import build
from tests.harness import run_distributed
from tests.training.loop_common import KilledTrainer, layout, make_config, params_checksum, train_losses

# ---- exact resume -----------------------------------------------------------------------------------------


def _resume_run(rank, world_size, tmp, overrides):
    full, _ = train_losses(make_config(f"{tmp}/full", *overrides))
    ck = f"{tmp}/crash/ck"
    crashed_cfg = make_config(f"{tmp}/crash", *overrides, f"checkpoint.save={ck}", "checkpoint.save_interval=3")
    crashed, _ = train_losses(crashed_cfg, KilledTrainer, kill_at=4)
    resumed, trainer = train_losses(
        make_config(f"{tmp}/crash", *overrides, f"checkpoint.save={ck}", f"checkpoint.load={ck}")
    )
    return full, crashed, resumed, trainer.consumed_samples


@pytest.mark.parametrize(
    ("world_size", "overrides"),
    [
        (2, layout(2, 1, "parallel.sequence_parallel=true")),
        (2, layout(1, 2)),
        (2, layout(1, 1, "ddp.use_distributed_optimizer=true", "precision.dtype=bf16")),
        (8, layout(2, 2, "ddp.use_distributed_optimizer=true", "parallel.virtual_stages=2")),
    ],
    ids=["tp2-sp", "pp2", "dp2-zero1-bf16", "tp2-pp2-dp2-interleaved-zero1"],
)
def test_crash_and_resume_continue_the_same_loss_curve(tmp_path, world_size, overrides):
    results = run_distributed(_resume_run, world_size, str(tmp_path), overrides, timeout=300)
    full, crashed, resumed, consumed = results[0]
    assert [s for s, _ in full] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(loss) for _, loss in full)
    assert crashed == full[:4]  # the crash came after step 4, whose checkpoint was never written
    assert resumed == full[3:]  # resumed from step 3: steps 4..6 again, bit for bit
    assert consumed == 6 * 8
    assert all(r == results[0] for r in results)  # every rank agrees on the losses


# ---- resharding -------------------------------------------------------------------------------------------


_RESHARD = ("training.train_iters=2", "schedule.decay_style=constant")


def _save_at_tp2_pp2(rank, world_size, tmp):
    ck = f"{tmp}/ck"
    _, trainer = train_losses(make_config(tmp, *layout(2, 2), *_RESHARD, f"checkpoint.save={ck}"))
    # Continue the same (unsaved) trainer by one step: the reference for the optimizer state's resharding.
    before = trainer.evaluate()
    out = trainer.train_step([_fixed_batch(trainer) for _ in range(trainer.num_microbatches)])
    return before, out.loss, trainer.evaluate()


def _load_elsewhere(rank, world_size, tmp, tp, extra):
    ck = f"{tmp}/ck"
    cfg = make_config(f"{tmp}/tp{tp}", *layout(tp, 1, *extra), *_RESHARD, f"checkpoint.load={ck}")
    trainer = Trainer(cfg, stream=io.StringIO())
    assert trainer.step == 2
    before = trainer.evaluate()
    out = trainer.train_step([_fixed_batch(trainer) for _ in range(trainer.num_microbatches)])
    return before, out.loss, trainer.evaluate()


def _fixed_batch(trainer):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, trainer.model_config.vocab_size, (2, 17), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def test_checkpoint_from_tp2_pp2_loads_at_tp1_and_tp4(tmp_path):
    ref_eval, ref_step_loss, ref_after = run_distributed(_save_at_tp2_pp2, 4, str(tmp_path))[0]
    # tp1 as two data-parallel ranks with ZeRO-1 (the optimizer state lands in flat dp shards), and tp4.
    for tp, world, extra in ((1, 2, ["ddp.use_distributed_optimizer=true"]), (4, 4, [])):
        ev, step_loss, after = run_distributed(_load_elsewhere, world, str(tmp_path), tp, extra)[0]
        assert ev == pytest.approx(ref_eval, rel=1e-5), tp  # same weights
        assert step_loss == pytest.approx(ref_step_loss, rel=1e-5), tp
        # One more step from the loaded optimizer state (Adam moments, masters) lands on the same model.
        assert after == pytest.approx(ref_after, rel=1e-4), tp
        assert after != pytest.approx(ev, rel=1e-6)


# ---- SIGTERM, NaN, model-only start -----------------------------------------------------------------------


class _SignalAtStep2(Trainer):
    def on_step_end(self, out) -> None:
        if self.step == 2 and self.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def _sigterm(rank, world_size, tmp):
    ck = f"{tmp}/ck"
    trainer = _SignalAtStep2(make_config(tmp, f"checkpoint.save={ck}", "training.train_iters=50"), stream=io.StringIO())
    reason = trainer.fit()
    trainer.close()
    return reason, trainer.step, [step for step, _ in list_checkpoints(ck)]


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path):
    for reason, step, saved in run_distributed(_sigterm, 2, str(tmp_path)):
        assert (reason, step, saved) == ("signal SIGTERM", 2, [2])


class _NaNTrainer(Trainer):
    nan_steps: tuple[int, ...] = ()

    def forward_backward(self, batches, *, forward_only=False):
        loss = super().forward_backward(batches, forward_only=forward_only)
        return float("nan") if not forward_only and self.step + 1 in self.nan_steps else loss

    def on_step_end(self, out) -> None:
        self.checksums.append(params_checksum(self))


def _nan(rank, world_size, tmp, nan_steps, max_consecutive):
    cfg = make_config(tmp, *layout(1, 2), f"training.max_consecutive_nonfinite={max_consecutive}")
    trainer = _NaNTrainer(cfg, stream=io.StringIO())
    trainer.nan_steps, trainer.checksums = nan_steps, []
    try:
        trainer.fit()
        error = None
    except NonFiniteLossError as exc:
        error = str(exc)
    trainer.close()
    applied = [h["applied"] for h in trainer.history if "applied" in h]
    return applied, trainer.checksums, trainer.skipped_steps, error


def test_nan_loss_skips_the_step_and_repeated_nans_stop(tmp_path):
    applied, sums, skipped, error = run_distributed(_nan, 2, str(tmp_path / "a"), (3,), 2)[0]
    assert error is None and skipped == 1
    assert applied == [True, True, False, True, True, True]
    assert sums[2] == sums[1]  # the skipped step left every parameter unchanged
    assert sums[3] != sums[2]
    records = (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["skipped_steps"] == 1
    applied, _, _, error = run_distributed(_nan, 2, str(tmp_path / "b"), (3, 4), 2)[0]
    assert applied == [True, True, False] and "2 non-finite losses in a row" in error


def _model_only(rank, world_size, tmp, tp, pp):
    cfg = make_config(f"{tmp}/tp{tp}pp{pp}", *layout(tp, pp), f"checkpoint.load={tmp}/imported")
    trainer = Trainer(cfg, stream=io.StringIO())
    loaded = trainer.evaluate()
    step = trainer.step
    samples = [trainer.valid_data[i] for i in range(cfg.training.global_batch_size)]  # what evaluate() reads
    trainer.fit()
    trainer.close()
    return step, loaded, samples, trainer.history[-1]["loss"]


def test_model_only_checkpoint_starts_training_at_any_layout(tmp_path):
    model_config = make_config(str(tmp_path)).model
    source = build(model_config, seed=77)  # not the run's seed: the weights must come from the file
    write_model_checkpoint(tmp_path / "imported", model_config.to_dict(), source.named_parameters())
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        step, loaded, samples, last_loss = run_distributed(_model_only, tp * pp, str(tmp_path), tp, pp)[0]
        ids = torch.stack([torch.as_tensor(s["input_ids"]) for s in samples])
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
        with torch.no_grad():
            reference = float(build_loss_fn(source)(source(ids), labels).mean())
        assert step == 0
        assert loaded == pytest.approx(reference, rel=1e-5), (tp, pp)
        assert math.isfinite(last_loss)
