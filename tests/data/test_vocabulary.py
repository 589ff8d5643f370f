"""Token-id ranges of datasets (scanned once per data, cached) and the check against a model's vocabulary."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megalith.data import IndexedDatasetWriter, check_vocabulary, token_id_range


def _write(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
    return str(prefix)


def test_range_is_scanned_in_blocks_and_cached_until_the_data_changes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    documents = [rng.integers(5, 60_000, size=int(rng.integers(1, 500))) for _ in range(40)]
    prefix = _write(tmp_path / "d", documents)
    flat = np.concatenate(documents)
    monkeypatch.setattr("megalith.data.vocabulary._READ_BYTES", 98)  # many blocks, the last one partial
    assert token_id_range(prefix) == (int(flat.min()), int(flat.max()))
    assert list((tmp_path / "d" / "cache" / "token_ids").glob("*-TokenIdRange-all-range.npy"))

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr("megalith.data.vocabulary._scan", no_scan)
    assert token_id_range(prefix) == (int(flat.min()), int(flat.max()))
    # Rewritten in place with the same layout (so the same .idx) but other ids: the .bin changed, so it is
    # scanned again.
    monkeypatch.undo()
    later = os.stat(prefix + ".bin").st_mtime_ns + 10**9
    _write(tmp_path / "d", [np.full(len(d), 7) for d in documents])
    os.utime(prefix + ".bin", ns=(later, later))
    assert token_id_range(prefix) == (7, 7)


def test_empty_dataset_has_no_range(tmp_path):
    assert token_id_range(_write(tmp_path / "e", [[]]), cache_dir=tmp_path / "cache") is None


def test_ids_outside_the_vocabulary_name_the_dataset_the_id_and_the_vocabulary(tmp_path):
    good = _write(tmp_path / "good", [[1, 2, 3], [99]])
    bad = _write(tmp_path / "bad", [[1, 2], [300, 4]])
    check_vocabulary(f"0.5 {good} 0.5 {good}", 100)
    with pytest.raises(ValueError, match=rf"{bad}: token id 300 is outside the model's vocabulary of 100 ids"):
        check_vocabulary(f"0.3 {good} 0.7 {bad}", 100)
    with pytest.raises(ValueError, match=r"good: token id 99 is outside the model's vocabulary of 99 ids"):
        check_vocabulary([good], 99)
    negative = _write(tmp_path / "neg", [[-5, 2]], np.int32)
    with pytest.raises(ValueError, match=r"neg: token id -5 is outside"):
        check_vocabulary(negative, 100, cache_dir=tmp_path / "cache")
