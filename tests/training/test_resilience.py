"""Stop signals and wall-clock limits agreed across ranks, non-finite loss policy, process-group setup."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from megalith.core.world import destroy_distributed, init_distributed
from megalith.training import trainer as trainer_module
from megalith.training.resilience import ExitMonitor, NonFiniteLossError, NonFiniteTracker
from tests.harness import run_distributed
from tests.training.loop_common import make_config


def _world_rank(rank, world_size):
    env = init_distributed()
    assert (env.rank, env.world_size, env.backend, env.device.type) == (rank, world_size, "gloo", "cpu")
    with ExitMonitor(duration_s=None) as monitor:
        assert monitor.check() is None
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only one rank is signalled
        first = monitor.check()
    # Only rank 0 has run past its duration; every rank must still stop.
    late = ExitMonitor(duration_s=50, start_time=time.time() - (100 if rank == 0 else 0), signals=())
    tracker = NonFiniteTracker("skip", max_consecutive=2)
    # Only the last rank sees the loss (like the last pipeline stage); the verdict is shared.
    verdicts = [
        tracker.check(s, loss if rank == world_size - 1 else None) for s, loss in enumerate([1.0, math.nan, 2.0])
    ]
    return first, late.check(), verdicts, tracker.skipped_total


def test_signals_durations_and_nonfinite_agree_across_ranks():
    results = run_distributed(_world_rank, 3, init=False)
    assert results == [("signal SIGTERM", "duration", [True, False, True], 1)] * 3


def test_nonfinite_policies():
    tracker = NonFiniteTracker("skip", max_consecutive=3)
    assert [tracker.check(i, x) for i, x in enumerate([1.0, float("inf"), torch.tensor(float("nan"))])] == [
        True,
        False,
        False,
    ]
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row \(steps 1\.\.3\)"):
        tracker.check(3, math.nan)
    restored = NonFiniteTracker("skip", 3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.skipped_total == 3
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        NonFiniteTracker("abort").check(7, math.nan)
    with pytest.raises(ValueError, match="'skip' or 'abort', got 'ignore'"):
        NonFiniteTracker("ignore")


def test_single_process_world(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed("gloo")
    try:
        assert (env.rank, env.world_size) == (0, 1)
        t = torch.ones(2)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
    finally:
        destroy_distributed()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            init_distributed("nccl")


_LOOP = textwrap.dedent(
    """
    import sys, time
    import torch
    from megalith.training.checkpointing import CheckpointManager
    from megalith.training.resilience import ExitMonitor

    manager = CheckpointManager(sys.argv[1])
    weights = torch.zeros(4)
    with ExitMonitor(duration_s=300) as monitor:
        for step in range(1, 10_000):
            weights += 1  # one "training step"
            print(f"step {step}", flush=True)
            time.sleep(0.05)
            reason = monitor.check()
            if reason:
                manager.save(step, {"model/w": weights}, extra={"stopped_by": reason})
                print(f"saved {step}", flush=True)
                sys.exit(0)
    """
)


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().startswith("step 1")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    saved = int(out.strip().splitlines()[-1].split()[1])
    from megalith.training.checkpointing import CheckpointManager

    target = {"model/w": torch.zeros(4)}
    loaded = CheckpointManager(tmp_path).load(target)
    assert loaded.step == saved and loaded.extra == {"stopped_by": "signal SIGTERM"}
    assert target["model/w"].tolist() == [float(saved)] * 4


def _dying_peer_rank(rank, world_size):
    init_distributed(timeout_s=5.0)
    if rank == 1:
        return None  # this rank leaves; its process exits without joining the collective below
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        dist.all_reduce(torch.ones(1))
    return time.monotonic() - start


def test_a_rank_that_leaves_makes_the_others_fail_instead_of_hanging():
    elapsed, _ = run_distributed(_dying_peer_rank, 2, init=False, timeout=60)
    assert elapsed < 30


def test_parallel_comm_timeout_reaches_the_process_group_and_the_comms(tmp_path, monkeypatch):
    """`parallel.comm_timeout` is the timeout of the process group the trainer starts (the test above shows what
    that timeout does when a rank leaves) and of the comms it builds (comm=nccl: the communicators' watchdog)."""
    seen = {}
    real_init, real_build = trainer_module.init_distributed, trainer_module.build_comms

    def init(backend, *, timeout_s):
        seen["process group"] = timeout_s
        return real_init(backend, timeout_s=timeout_s)

    def build(dims, kind, *, device, timeout):
        seen["comms"] = timeout
        return real_build(dims, kind, device=device, timeout=timeout)

    monkeypatch.setattr(trainer_module, "init_distributed", init)
    monkeypatch.setattr(trainer_module, "build_comms", build)
    trainer_module.Trainer(make_config(str(tmp_path), "parallel.comm_timeout=42.5"), stream=io.StringIO()).close()
    assert seen == {"process group": 42.5, "comms": 42.5}
