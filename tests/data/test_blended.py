"""Split strings, blend strings, BlendedDataset and the train/valid/test builder."""

from __future__ import annotations

import numpy as np
import pytest

from megalith.data import (
    BlendedDataset,
    GPTDatasetConfig,
    IndexedDatasetWriter,
    build_gpt_datasets,
    parse_blend,
    parse_split,
    split_ranges,
)


def test_split_strings():
    np.testing.assert_allclose(parse_split("969,30,1"), [(0, 0.969), (0.969, 0.999), (0.999, 1.0)])
    assert parse_split("1") == [(0.0, 1.0), (1.0, 1.0), (1.0, 1.0)]
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("98,2,0", 17) == [(0, round(0.98 * 17)), (round(0.98 * 17), 17), (17, 17)]
    with pytest.raises(ValueError, match="split 'a,b' must be"):
        parse_split("a,b")
    with pytest.raises(ValueError, match="1 to 3 non-negative numbers"):
        parse_split("1,1,1,1")


def test_blend_strings():
    assert parse_blend("0.3 a 0.9 b") == (["a", "b"], pytest.approx([0.25, 0.75]))
    assert parse_blend("a b") == (["a", "b"], None)
    with pytest.raises(ValueError, match="alternate 'weight prefix' pairs"):
        parse_blend("0.3 a 0.7")
    with pytest.raises(ValueError, match="mixes weighted and unweighted"):
        parse_blend("a 0.5 b")


def _dataset(prefix, value, num_docs=40):
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for d in range(num_docs):
            writer.add_document(np.full(10 + d % 7, value))
    return str(prefix)


def test_blend_of_two_datasets_follows_weights_and_splits(tmp_path):
    a, b = _dataset(tmp_path / "a", 1), _dataset(tmp_path / "b", 2)
    cfg = GPTDatasetConfig(seq_length=8, cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(f"0.25 {a} 0.75 {b}", "90,10,0", (200, 20, None), cfg)
    assert test is None
    assert isinstance(train, BlendedDataset) and len(train) == 200 and len(valid) == 20
    counts = np.bincount(train.dataset_index, minlength=2)
    assert counts.tolist() == [50, 150]
    for i in range(0, 200, 17):
        item = train[i]
        # Every token of a sample comes from the dataset the blend says it does.
        assert set(item["input_ids"].tolist()) == {int(item["dataset_id"]) + 1}
    # The train split of each dataset only reads sequences [0, 36); valid only [36, 40).
    for part in train.datasets:
        assert set(part.document_index.tolist()) <= set(range(36))
    for part in valid.datasets:
        assert set(part.document_index.tolist()) == set(range(36, 40))
    again = build_gpt_datasets(f"0.25 {a} 0.75 {b}", "90,10,0", (200, 20, None), cfg)[0]
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)


def test_exhaustive_blend_and_too_small_dataset(tmp_path):
    a, b = _dataset(tmp_path / "a", 1, 10), _dataset(tmp_path / "b", 2, 20)
    cfg = GPTDatasetConfig(seq_length=8, cache_dir=str(tmp_path / "cache"))
    train, _, _ = build_gpt_datasets(f"{a} {b}", "1", (None, None, None), cfg)
    sizes = [len(d) for d in train.datasets]
    assert len(train) == sum(sizes)
    for k in range(2):
        assert sorted(train.dataset_sample_index[train.dataset_index == k].tolist()) == list(range(sizes[k]))
    with pytest.raises(ValueError, match=r"dataset 0 of the blend has \d+ samples but the blend needs"):
        BlendedDataset(train.datasets, [0.9, 0.1], 200)
    with pytest.raises(FileNotFoundError, match=r"no \.bin/\.idx pair for .*missing"):
        build_gpt_datasets(str(tmp_path / "missing"), "1", (None, None, None), cfg)
