"""The C++ sample and blending index builders against slow pure-Python references and the worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from megalith.data import (
    build_blending_index,
    build_exhaustive_blending_index,
    build_sample_index,
    count_samples,
)
from tests.data.reference_indexing import (
    reference_blending_index,
    reference_exhaustive_blending_index,
    reference_sample_index,
)


def test_worked_examples_from_the_format_reference():
    # ../shared/reference/megatron.md section 3.1: sizes [5,3,7,2], document order [2,0,3,1].
    sizes = np.array([5, 3, 7, 2], np.int32)
    order = np.array([2, 0, 3, 1], np.int32)
    index = build_sample_index(sizes, order, 4, 1, 17, drop_last_partial=True, add_extra_token=True)
    assert index.tolist() == [[0, 0], [0, 4], [1, 1], [2, 0], [3, 2]]
    index = build_sample_index(sizes, order, 5, 1, 17, drop_last_partial=False, add_extra_token=True)
    assert index.tolist() == [[0, 0], [0, 5], [1, 3], [3, 1], [3, 2]]
    dataset_index, sample_index = build_blending_index([0.3, 0.7], 10)
    assert dataset_index.tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    assert sample_index.tolist() == [0, 0, 1, 2, 1, 3, 4, 2, 5, 6]


def _random_case(rng):
    kind = rng.integers(5)
    if kind == 0:  # one document
        sizes = rng.integers(1, 60, size=1)
    elif kind == 1:  # many empty documents
        sizes = rng.integers(0, 4, size=rng.integers(1, 30)) * rng.integers(0, 2, size=1)
        sizes[rng.integers(len(sizes))] += rng.integers(1, 10)
    elif kind == 2:  # documents much longer than a sample
        sizes = rng.integers(20, 200, size=rng.integers(1, 8))
    else:
        sizes = rng.integers(0, 25, size=rng.integers(1, 40))
        if sizes.sum() == 0:
            sizes[0] = 1
    sizes = sizes.astype(np.int32)
    num_epochs = int(rng.integers(1, 4))
    order = np.concatenate([rng.permutation(len(sizes)) for _ in range(num_epochs)]).astype(np.int32)
    seq_length = int(rng.integers(1, 24))
    return sizes, order, seq_length, num_epochs, int(sizes.sum())


def test_sample_index_matches_reference_on_random_cases():
    rng = np.random.default_rng(1234)
    checked_partial = checked_empty = 0
    for _ in range(3000):
        sizes, order, seq_length, num_epochs, tokens_per_epoch = _random_case(rng)
        for drop in (True, False):
            for extra in (True, False):
                expected = reference_sample_index(sizes, order, seq_length, num_epochs, tokens_per_epoch, drop, extra)
                got = build_sample_index(sizes, order, seq_length, num_epochs, tokens_per_epoch, drop, extra)
                assert got.dtype == np.int32
                np.testing.assert_array_equal(
                    got, expected, err_msg=f"{sizes=} {order=} {seq_length=} {drop=} {extra=}"
                )
                checked_partial += (not drop) and (num_epochs * tokens_per_epoch - extra) % seq_length != 0
        checked_empty += bool((sizes == 0).any())
    assert checked_partial > 100 and checked_empty > 100  # the edge cases were really exercised


def test_sample_index_accepts_int64_document_index():
    sizes = np.array([4, 9, 2], np.int32)
    order = np.array([1, 2, 0, 0, 1, 2], np.int64)
    expected = reference_sample_index(sizes, order, 3, 2, 15, True, True)
    np.testing.assert_array_equal(build_sample_index(sizes, order, 3, 2, 15), expected)


def test_sample_count_formula():
    assert count_samples(1, 17, 4) == 4
    assert count_samples(1, 17, 5, drop_last_partial=False) == 4
    assert count_samples(2, 10, 4, add_extra_token=False) == 5
    assert count_samples(1, 1, 4) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(sizes=[3, 4], document_index=[0, 2], seq_length=2, num_epochs=1, tokens_per_epoch=7),
            r"document_index\[1\] = 2 is outside sizes \(2 documents\)",
        ),
        (
            dict(sizes=[3, -4], document_index=[0, 1], seq_length=2, num_epochs=1, tokens_per_epoch=7),
            r"sizes\[1\] = -4 is negative",
        ),
        (
            dict(sizes=[3, 4], document_index=[0, 1], seq_length=2, num_epochs=1, tokens_per_epoch=20),
            r"runs out of tokens at sample",
        ),
        (
            dict(sizes=[3, 4], document_index=[0, 1], seq_length=0, num_epochs=1, tokens_per_epoch=7),
            r"seq_length must be positive, got 0",
        ),
        (
            dict(sizes=[3.5, 4], document_index=[0, 1], seq_length=2, num_epochs=1, tokens_per_epoch=7),
            r"sizes must hold integers",
        ),
        (
            dict(sizes=[2**40], document_index=[0], seq_length=2, num_epochs=1, tokens_per_epoch=7),
            r"sizes holds values in .* outside the range of int32",
        ),
        (
            dict(sizes=[[3, 4]], document_index=[0], seq_length=2, num_epochs=1, tokens_per_epoch=7),
            r"sizes must be 1-D",
        ),
    ],
)
def test_sample_index_rejects_bad_input_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_sample_index(**kwargs)


def test_blending_matches_reference_on_random_weights():
    rng = np.random.default_rng(7)
    for _ in range(300):
        num = int(rng.integers(1, 6))
        weights = rng.random(num)
        weights[rng.random(num) < 0.2] = 0.0
        weights = weights / weights.sum() if weights.sum() else np.full(num, 1.0 / num)
        size = int(rng.integers(0, 400))
        got = build_blending_index(weights, size)
        expected = reference_blending_index(list(weights), size)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_exhaustive_blending_uses_every_sample_once():
    rng = np.random.default_rng(11)
    for _ in range(300):
        sizes = [int(s) for s in rng.integers(0, 60, size=rng.integers(1, 6))]
        dataset_index, sample_index = build_exhaustive_blending_index(sizes)
        expected = reference_exhaustive_blending_index(sizes)
        np.testing.assert_array_equal(dataset_index, expected[0])
        np.testing.assert_array_equal(sample_index, expected[1])
        for k, size in enumerate(sizes):
            assert sorted(sample_index[dataset_index == k].tolist()) == list(range(size))


def test_blending_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite non-negative number"):
        build_blending_index([0.5, -0.5], 4)
    with pytest.raises(ValueError, match="at least one dataset"):
        build_blending_index([], 4)
    with pytest.raises(ValueError, match=r"sizes\[0\] must be non-negative"):
        build_exhaustive_blending_index([-1, 3])
