"""Overlapped communication in the training loop: a checkpoint saved while the last step's parameter gathers are
still in flight (`ddp.overlap_param_gather`) holds the gathered weights; with it and `parallel.overlap_p2p_comm`
the run's losses and weights are those of the synchronous run."""

from __future__ import annotations

import io

import pytest
import torch

from megalith.core.checkpoint import read_tensor_metadata
from megalith.core.checkpoint.sharded import read_full_tensors
from megalith.core.distributed import AdamW
from megalith.training.run_config import RunConfig
from megalith.training.trainer import Trainer
from tests.core.pipe.test_overlap_param_gather import _late_gathers
from tests.harness import run_distributed
from tests.training.loop_common import layout, make_config, params_checksum, train_losses

_ZERO = ("ddp.use_distributed_optimizer=true", "ddp.bucket_size=2000", "training.train_iters=3",
         "checkpoint.save_interval=1", "checkpoint.keep_last=5")  # fmt: skip


def _run(rank, world_size, tmp, overlap: bool, skip_finish: bool = False):
    ck = f"{tmp}/ck"
    cfg = make_config(tmp, *_ZERO, f"ddp.overlap_param_gather={str(overlap).lower()}", f"checkpoint.save={ck}")
    if skip_finish:  # the negative control: nothing outside the forward waits for the gathers
        AdamW.finish_param_gather = lambda self: None
    with _late_gathers():
        losses, trainer = train_losses(cfg)
    return losses, ck, sum(len(c.buckets) for c in trainer.chunks)


def _model_tensors(ck: str, step: int) -> dict:
    path = f"{ck}/iter_{step:07d}"
    names = [n for n in read_tensor_metadata(path) if n.startswith("model/")]
    return read_full_tensors(path, names)


def test_checkpoints_saved_with_gathers_in_flight_hold_the_gathered_weights(tmp_path):
    sync_losses, sync_ck, _ = run_distributed(_run, 2, str(tmp_path / "sync"), False)[0]
    over_losses, over_ck, num_buckets = run_distributed(_run, 2, str(tmp_path / "over"), True)[0]
    assert num_buckets > 2
    assert over_losses == sync_losses
    for step in (1, 2, 3):
        sync, over = _model_tensors(sync_ck, step), _model_tensors(over_ck, step)
        assert sync.keys() == over.keys()
        for name, value in sync.items():
            assert value.equal(over[name]), f"step {step}: {name} differs"
    # Without the wait before saving, the same run saves last step's values for the other rank's shards.
    _, broken_ck, _ = run_distributed(_run, 2, str(tmp_path / "broken"), True, True)[0]
    sync, broken = _model_tensors(sync_ck, 1), _model_tensors(broken_ck, 1)
    assert any(not value.equal(broken[name]) for name, value in sync.items())


def test_overlap_param_gather_is_refused_with_compiled_blocks(tmp_path):
    with pytest.raises(ValueError, match=r"ddp\.overlap_param_gather=true cannot be combined with runtime\.compile"):
        make_config(str(tmp_path), *_ZERO, "ddp.overlap_param_gather=true", "runtime.compile=true")
    assert isinstance(make_config(str(tmp_path), *_ZERO, "ddp.overlap_param_gather=true"), RunConfig)


def _pipeline_run(rank, world_size, tmp, overlap: bool):
    on = str(overlap).lower()
    cfg = make_config(tmp, *layout(1, 2, *_ZERO[:2]), f"ddp.overlap_param_gather={on}",
                      f"parallel.overlap_p2p_comm={on}", "training.train_iters=3")  # fmt: skip
    losses, trainer = train_losses(cfg)
    return losses, params_checksum(trainer)


def test_a_pipelined_zero1_run_with_both_overlaps_matches_the_synchronous_run(tmp_path):
    plain = run_distributed(_pipeline_run, 4, str(tmp_path / "plain"), False)
    over = run_distributed(_pipeline_run, 4, str(tmp_path / "over"), True)
    assert [s for s, _ in plain[0][0]] == [1, 2, 3]
    assert over == plain


def test_overlap_p2p_comm_is_refused_when_the_run_would_use_nccl(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # backend auto would pick NCCL
    cfg = make_config(str(tmp_path), *layout(1, 2), "parallel.overlap_p2p_comm=true")
    with pytest.raises(ValueError, match=r"overlap_p2p_comm=true is implemented for the gloo backend only.*uses nccl"):
        Trainer(cfg, stream=io.StringIO())
