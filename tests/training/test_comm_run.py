"""`parallel.comm` in megalith-train: its validation, the trainer routing the gradient buckets, ZeRO-1's gathers and
the pipeline through the comms it builds (closing them at the end and after a failed start), and on GPUs a run over
Megalith's NCCL communicator matching the torch.distributed one."""

from __future__ import annotations

import io
from unittest import mock

import pytest
import torch

from megalith.core.distributed import build_comms
from megalith.kernels import nccl
from megalith.training.config_tree import ConfigError
from megalith.training.trainer import Trainer
from tests.core.pipe.comm_doubles import RecordingComm, wrap_comms
from tests.harness import run_distributed
from tests.training.loop_common import layout, make_config, train_losses

_SHORT = ("training.train_iters=2",)


def test_comm_values_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"comm must be one of torch, nccl, got 'mpi'"):
        make_config(str(tmp_path), "parallel.comm=mpi")
    with pytest.raises(ConfigError, match=r"comm 'nccl' needs a CUDA device, but device is 'cpu'; use comm=torch"):
        make_config(str(tmp_path), "parallel.comm=nccl", "parallel.device=cpu")
    without = r"comm 'nccl' needs megalith-kernels built with CUDA .*MEGALITH_CUDA=ON"
    with mock.patch.object(nccl, "has_communicator", return_value=False), pytest.raises(ConfigError, match=without):
        make_config(str(tmp_path), "parallel.comm=nccl")
    assert make_config(str(tmp_path)).parallel.comm == "torch"


def _nccl_on_cpu_worker(rank, world, tmp):
    # A CUDA build (pretended here) passes the config check; the run then resolves to the CPU, which is refused.
    with mock.patch.object(nccl, "has_communicator", return_value=True):
        cfg = make_config(tmp, "parallel.comm=nccl", *_SHORT)
        with pytest.raises(ValueError, match=r"parallel.comm='nccl' needs a CUDA device, but training runs on cpu"):
            Trainer(cfg, stream=io.StringIO())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_nccl_comm_refused_when_training_runs_on_cpu(tmp_path):
    run_distributed(_nccl_on_cpu_worker, 1, str(tmp_path), timeout=120)


def _recording_build(made: list, log: list):
    """A build_comms that wraps every comm in a RecordingComm and remembers the Comms it made."""

    def build(*args, **kwargs):
        comms = wrap_comms(build_comms(*args, **kwargs), lambda comm, role: RecordingComm(comm, role, log))
        made.append(comms)
        return comms

    return build


def _trainer_worker(rank, world, tmp, overrides):
    plain, _ = train_losses(make_config(f"{tmp}/plain", *overrides))
    made, log = [], []
    with mock.patch("megalith.training.trainer.build_comms", _recording_build(made, log)):
        recorded, trainer = train_losses(make_config(f"{tmp}/recorded", *overrides))
    (comms,) = made
    on_buckets = all(b.comm is comms.grad(b.expert) for chunk in trainer.chunks for b in chunk.buckets)
    closed = all(getattr(comms, role).closed for role in ("dense", "expert", "pp"))
    kinds = sorted({kind for _, kind, _ in log})
    return plain, recorded, on_buckets, closed, kinds


def test_trainer_routes_through_its_comms_and_closes_them(tmp_path):
    """pp2 x dp2 with ZeRO-1: the losses of a run whose comms record are the plain run's, bit for bit, and every
    kind of traffic went through the comms the trainer built (which close() closed)."""
    overrides = (*layout(1, 2, "ddp.use_distributed_optimizer=true"), *_SHORT)
    results = run_distributed(_trainer_worker, 4, str(tmp_path), overrides, timeout=300)
    for plain, recorded, on_buckets, closed, kinds in results:
        assert len(plain) == 2 and recorded == plain
        assert on_buckets and closed
        assert kinds == ["all_gather", "recv", "reduce_scatter", "send"]


def _failed_start_worker(rank, world, tmp):
    made = []
    with (
        mock.patch("megalith.training.trainer.build_comms", _recording_build(made, [])),
        mock.patch("megalith.training.trainer.load_tokenizer", side_effect=OSError("tokenizer unreadable")),
        pytest.raises(OSError, match="tokenizer unreadable"),
    ):
        Trainer(make_config(tmp, *_SHORT), stream=io.StringIO())
    (comms,) = made
    return all(getattr(comms, role).closed for role in ("dense", "expert", "pp"))


def test_comms_are_closed_when_the_trainer_fails_to_start(tmp_path):
    assert run_distributed(_failed_start_worker, 2, str(tmp_path), timeout=120) == [True, True]


# ---- on GPUs -----------------------------------------------------------------------------------------------


def _gpu_run_worker(rank, world, tmp, overrides):
    out = {}
    for comm in ("torch", "nccl"):
        cfg = make_config(f"{tmp}/{comm}", "parallel.device=cuda", f"parallel.comm={comm}", *overrides)
        losses, trainer = train_losses(cfg)
        out[comm] = losses
        if comm == "nccl":
            out["nccl_comms"] = type(trainer.comms.dense).__name__, type(trainer.comms.pp).__name__
    return out


@pytest.mark.cuda
@pytest.mark.parametrize(
    "overrides",
    [
        (*layout(1, 1, "ddp.use_distributed_optimizer=true"), "training.train_iters=4"),
        (*layout(1, 2), "training.train_iters=4"),
    ],
    ids=["dp2-zero1", "pp2"],
)
def test_nccl_comm_run_matches_torch_comm(tmp_path, overrides):
    """Two ranks on two GPUs (NCCL refuses two ranks on one device): the same loss curve over both transports."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: a communicator of two ranks cannot share one device")
    results = run_distributed(_gpu_run_worker, 2, str(tmp_path), overrides, init=False, timeout=600)
    for out in results:
        assert len(out["nccl"]) == 4
        for (step, a), (step_b, b) in zip(out["torch"], out["nccl"], strict=True):
            assert step == step_b
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert "NcclGroupComm" in results[0]["nccl_comms"]
