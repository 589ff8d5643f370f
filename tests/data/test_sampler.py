"""PretrainingSampler: data-parallel shards cover each global batch exactly once and resume exactly."""

from __future__ import annotations

import numpy as np
import pytest

from megalith.data import PretrainingSampler, collate


@pytest.mark.parametrize(("mbs", "gbs", "dp"), [(2, 8, 2), (1, 12, 3), (4, 4, 1), (2, 16, 4)])
def test_ranks_partition_every_global_batch_and_resume_exactly(mbs, gbs, dp):
    total = 10 * gbs + 3  # a trailing partial global batch is never served
    per_rank = [list(PretrainingSampler(total, 0, mbs, gbs, r, dp)) for r in range(dp)]
    steps = gbs // (mbs * dp)
    for r in range(dp):
        assert len(per_rank[r]) == 10 * steps and all(len(b) == mbs for b in per_rank[r])
    for g in range(10):
        served = sorted(i for r in range(dp) for b in per_rank[r][g * steps : (g + 1) * steps] for i in b)
        assert served == list(range(g * gbs, (g + 1) * gbs))
    for consumed_batches in (1, 4, 10):
        for r in range(dp):
            resumed = list(PretrainingSampler(total, consumed_batches * gbs, mbs, gbs, r, dp))
            assert resumed == per_rank[r][consumed_batches * steps :]


def test_sampler_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match=r"global_batch_size \(10\) is not divisible by micro_batch_size \* dp"):
        PretrainingSampler(100, 0, 2, 10, 0, 3)
    with pytest.raises(ValueError, match=r"consumed_samples \(5\) must be a non-negative multiple"):
        PretrainingSampler(100, 5, 2, 8, 0, 2)
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in"):
        PretrainingSampler(100, 0, 2, 8, 2, 2)


def test_collate_stacks_items():
    items = [{"input_ids": np.arange(3) + i, "loss_mask": np.ones(3, np.float32)} for i in range(2)]
    batch = collate(items)
    assert batch["input_ids"].tolist() == [[0, 1, 2], [1, 2, 3]] and batch["loss_mask"].shape == (2, 3)
