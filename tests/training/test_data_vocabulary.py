"""build_datasets refuses data whose token ids do not fit the model's vocabulary, naming the dataset."""

from __future__ import annotations

import numpy as np
import pytest

from megalith.data import IndexedDatasetWriter
from megalith.training.data import build_datasets
from megalith.training.run_config import DataConfig


def test_ids_past_the_vocabulary_stop_the_run_before_training(tmp_path):
    prefix = str(tmp_path / "d")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(20):
            writer.add_document(rng.integers(0, 500, size=30))
        writer.add_document([3, 700, 4])  # one id the 600-id model cannot embed
    data = DataConfig(blend=prefix, split="90,10,0", seq_len=8)
    with pytest.raises(ValueError, match=rf"{prefix}: token id 700 is outside the model's vocabulary of 600 ids"):
        build_datasets(data, train_samples=10, valid_samples=2, vocab_size=600, seed=1)
    train, _ = build_datasets(data, train_samples=10, valid_samples=2, vocab_size=701, seed=1)
    assert len(train) >= 10
