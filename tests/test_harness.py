"""The multi-process test harness itself: results, failures, hangs and torchrun-style initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import DistributedTestError, run_distributed


def _all_reduce_rank(rank, world_size):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return rank, world_size, value.item()


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # the other ranks wait here; the harness must not wait for them forever
    return rank


def _hang_forever(rank, world_size):
    if rank == 0:
        dist.barrier()  # rank 1 never joins
    else:
        import time

        time.sleep(3600)


def _init_from_environment(rank, world_size):
    dist.init_process_group("gloo")  # same call a script launched by torchrun makes
    tensor = torch.zeros(world_size)
    tensor[rank] = rank
    dist.all_reduce(tensor)
    return tensor.tolist()


@pytest.mark.parametrize("world_size", [2, 3])
def test_results_come_back_per_rank(world_size):
    results = run_distributed(_all_reduce_rank, world_size)
    expected_sum = world_size * (world_size + 1) / 2
    assert results == [(rank, world_size, expected_sum) for rank in range(world_size)]


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank_one, 3, timeout=60)
    message = str(info.value)
    assert "first: rank 1" in message
    assert "deliberate failure on rank one" in message


def test_a_hang_times_out_instead_of_blocking():
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_hang_forever, 2, timeout=8)


def test_ranks_can_initialise_from_the_torchrun_environment():
    results = run_distributed(_init_from_environment, 2, init=False)
    assert results == [[0.0, 1.0], [0.0, 1.0]]
