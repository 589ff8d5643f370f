"""Checkpoint directories: atomic publish, keep-last-N, async save, RNG and JSON state, kill -9 during a save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from megalith.core.checkpoint import LocalShard, ShardSpec, read_full_tensors
from megalith.training.checkpointing import CheckpointManager, find_checkpoint, has_optimizer_state
from tests.harness import run_distributed


def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(6, 4, generator=g), "model/b": torch.randn(4, generator=g)}


def test_save_load_keep_last_rng_and_extra(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        manager.save(step, make_state(step), extra={"scheduler": {"step": step}, "data": {"consumed": 8 * step}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000004"
    expected_draw = (torch.rand(3), np.random.rand(), __import__("random").random())
    target = {k: torch.zeros_like(v) for k, v in make_state(0).items()}
    loaded = manager.load(target)
    assert loaded.step == 4 and loaded.extra == {"scheduler": {"step": 4}, "data": {"consumed": 32}}
    assert loaded.rng_restored and not has_optimizer_state(loaded.path)
    assert all(torch.equal(target[k], v) for k, v in make_state(4).items())
    draw = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(draw[0], expected_draw[0]) and draw[1:] == expected_draw[1:]
    with pytest.raises(ValueError, match="must be JSON-able"):
        manager.save(5, make_state(5), extra={"bad": object()})
    assert find_checkpoint(tmp_path / "nothing") is None


def _async_rank(rank, world_size, root):
    full = make_state(7)["model/w"]
    rows = full.shape[0] // world_size
    local = full[rank * rows : (rank + 1) * rows].clone()
    spec = ShardSpec(tuple(full.shape), 0, ((0, rows, rank * rows),))
    manager = CheckpointManager(root, keep_last=None, async_save=True)
    torch.manual_seed(100 + rank)
    manager.save(3, {"model/w": LocalShard(local, spec)}, extra={"rank0_only": 1})
    local.fill_(-1.0)  # training goes on while the background thread writes the CPU copy
    next_draw = torch.rand(2)
    manager.wait()
    target = torch.zeros(rows, full.shape[1])
    loaded = manager.load({"model/w": LocalShard(target, spec)})
    assert loaded.rng_restored and torch.equal(torch.rand(2), next_draw)
    assert torch.equal(target, full[rank * rows : (rank + 1) * rows])
    return loaded.step


def test_async_save_in_a_two_rank_world_then_one_process(tmp_path):
    assert run_distributed(_async_rank, 2, str(tmp_path)) == [3, 3]
    got = read_full_tensors(tmp_path / "iter_0000003", ["model/w"])["model/w"]
    assert torch.equal(got, make_state(7)["model/w"])
    manager = CheckpointManager(tmp_path)
    target = {"model/w": torch.zeros(6, 4)}
    loaded = manager.load(target)
    assert not loaded.rng_restored  # saved by 2 ranks, loaded by 1
    assert loaded.extra == {"rank0_only": 1}


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from megalith.core.checkpoint.storage import TensorIndex
    from megalith.training.checkpointing import CheckpointManager
    from tests.training.test_checkpointing import make_state

    manager = CheckpointManager(sys.argv[1], keep_last=1)
    manager.save(1, make_state(1))

    def stall(self, root):  # the data files of step 2 are written; its index is not
        print("STALLED", flush=True)
        time.sleep(600)

    TensorIndex.write = stall
    manager.save(2, make_state(2))
    """
)


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(root)], stdout=subprocess.PIPE, text=True, env=env, cwd=os.getcwd()
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "STALLED" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "STALLED" in line, f"the saving process did not reach the stall point (exit code {proc.poll()})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (root / "iter_0000002.tmp").is_dir() and not (root / "iter_0000002").exists()
    manager = CheckpointManager(root, keep_last=1)
    target = {k: torch.zeros_like(v) for k, v in make_state(0).items()}
    assert manager.load(target).step == 1
    assert all(torch.equal(target[k], v) for k, v in make_state(1).items())
    manager.save(2, make_state(2))  # the next save clears the leftover and replaces step 1
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "latest"]
