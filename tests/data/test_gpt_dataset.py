"""GPTDataset: indices against a reference written from the format notes, sample contents, items, caching."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle

import numpy as np
import pytest

from megalith.data import GPTDataset, GPTDatasetConfig, IndexedDataset, IndexedDatasetWriter
from megalith.data.gpt_dataset import build_gpt_indices
from tests.data.reference_indexing import reference_sample_index

EOD = 999


def _write(prefix, num_docs=30, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_docs):
            writer.add_document(np.append(rng.integers(0, 900, size=int(rng.integers(0, max_len))), EOD))
    return IndexedDataset(prefix)


def _reference_indices(lengths, ids, num_samples, seq, seed, extra=1, drop=True):
    """Megatron-LM's GPT index recipe, step by step as reference/megatron.md section 3.2 states it."""
    tokens_per_epoch = int(sum(int(lengths[i]) for i in ids))
    epochs = 1
    if num_samples is not None:
        while epochs * tokens_per_epoch < num_samples * seq + extra:
            epochs += 1
    separate = False
    if epochs > 1:
        before = ((epochs - 1) * tokens_per_epoch - extra) // seq
        per_epoch = (tokens_per_epoch - extra) // seq
        separate = num_samples - before < int(0.8 * per_epoch)
    rng = np.random.RandomState(seed)
    if separate:
        first = np.array(list(ids) * (epochs - 1), np.int32)
        rng.shuffle(first)
        last = np.array(list(ids), np.int32)
        rng.shuffle(last)
        documents = np.concatenate([first, last])
    else:
        documents = np.array(list(ids) * epochs, np.int32)
        rng.shuffle(documents)
    samples = reference_sample_index(lengths, documents, seq, epochs, tokens_per_epoch, drop, bool(extra))
    total = len(samples) - 1
    split_at = before if separate else total
    order_a = np.arange(split_at, dtype=np.uint32)
    rng.shuffle(order_a)
    order_b = np.arange(split_at, total, dtype=np.uint32)
    if split_at != total:
        rng.shuffle(order_b)
    return documents, samples, np.concatenate([order_a, order_b]), separate


@pytest.mark.parametrize(("num_samples", "seq"), [(None, 8), (10, 8), (70, 16), (200, 5), (41, 31)])
def test_indices_match_the_reference_recipe(tmp_path, num_samples, seq):
    ds = _write(tmp_path / "d")
    ids = np.arange(3, 27)
    got = build_gpt_indices(ds.sequence_lengths, ids, num_samples, seq, seed=17)
    documents, samples, shuffle, _ = _reference_indices(ds.sequence_lengths, ids, num_samples, seq, 17)
    np.testing.assert_array_equal(got["document_index"], documents)
    np.testing.assert_array_equal(got["sample_index"], samples)
    np.testing.assert_array_equal(got["shuffle_index"], shuffle)
    assert got["document_index"].dtype == np.int32 and got["shuffle_index"].dtype == np.uint32
    if num_samples is not None:
        assert len(got["sample_index"]) - 1 >= num_samples


def test_separate_final_epoch_is_shuffled_on_its_own(tmp_path):
    ds = _write(tmp_path / "d")
    tokens = int(ds.sequence_lengths.sum())
    per_epoch = (tokens - 1) // 8
    got = build_gpt_indices(ds.sequence_lengths, np.arange(len(ds)), per_epoch + 3, 8, seed=5)
    _, _, _, separate = _reference_indices(ds.sequence_lengths, np.arange(len(ds)), per_epoch + 3, 8, 5)
    assert separate
    assert sorted(got["document_index"][len(ds) :].tolist()) == list(range(len(ds)))
    before = (tokens - 1) // 8
    assert sorted(got["shuffle_index"][:before].tolist()) == list(range(before))


def test_samples_are_consecutive_windows_of_the_document_stream(tmp_path):
    ds = _write(tmp_path / "d")
    cfg = GPTDatasetConfig(seq_length=12, seed=3, cache_dir=str(tmp_path / "cache"))
    gpt = GPTDataset(ds, np.arange(len(ds)), 50, config=cfg)
    stream = np.concatenate([ds[int(d)] for d in gpt.document_index]).astype(np.int64)
    for j in range(len(gpt)):
        tokens, real = gpt.sample_tokens(j)
        assert real == 13
        np.testing.assert_array_equal(tokens, stream[j * 12 : j * 12 + 13])
    item = gpt[4]
    text, _ = gpt.sample_tokens(int(gpt.shuffle_index[4]))
    np.testing.assert_array_equal(item["input_ids"], text[:-1])
    np.testing.assert_array_equal(item["labels"], text[1:])
    assert item["input_ids"].dtype == np.int64 and item["labels"].dtype == np.int64
    assert item["loss_mask"].dtype == np.float32 and item["loss_mask"].tolist() == [1.0] * 12
    assert item["position_ids"].tolist() == list(range(12))


def test_partial_last_sample_eod_mask_and_position_reset(tmp_path):
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, EOD])
        writer.add_document([3, 4, 5, 6, EOD])
    cfg = GPTDatasetConfig(
        seq_length=5,
        seed=1,
        eod=EOD,
        pad=0,
        eod_mask_loss=True,
        reset_position_ids=True,
        drop_last_partial_validation=False,
        cache_dir=str(tmp_path / "cache"),
    )
    gpt = GPTDataset(prefix, config=cfg, split="valid")
    assert len(gpt) == 2
    items = {}
    for i in range(2):
        item = gpt[i]
        items[int(gpt.shuffle_index[i])] = item
    full, partial = items[0], items[1]
    stream = np.concatenate([IndexedDataset(prefix)[int(d)] for d in gpt.document_index]).tolist()
    assert full["input_ids"].tolist() == stream[:5]
    # Loss masked where the input is EOD; positions restart after each EOD.
    eod_at = stream[:5].index(EOD)
    assert full["loss_mask"][eod_at] == 0.0 and full["labels"][eod_at] == -100
    assert full["position_ids"].tolist() == [*range(eod_at + 1), *range(5 - eod_at - 1)]
    # The last sample has 8 - 5 = 3 real tokens: 2 inputs with labels, the rest padding with the loss masked.
    assert partial["input_ids"].tolist()[:3] == stream[5:8] and partial["input_ids"].tolist()[3:] == [0, 0]
    assert partial["loss_mask"].tolist()[2:] == [0.0, 0.0, 0.0]
    assert partial["labels"].tolist()[2:] == [-100, -100, -100]


def test_cache_files_are_named_reused_and_invalidated(tmp_path):
    ds = _write(tmp_path / "d")
    cfg = GPTDatasetConfig(seq_length=8)
    first = GPTDataset(ds, num_samples=20, config=cfg, split="train")
    cache_dir = tmp_path / "d" / "cache" / "GPTDataset_indices"
    description = next(cache_dir.glob("*-GPTDataset-train-description.txt"))
    md5 = hashlib.md5(description.read_bytes()).hexdigest()
    assert description.name == f"{md5}-GPTDataset-train-description.txt"
    assert json.loads(description.read_text())["sequence_length"] == 8
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert (cache_dir / f"{md5}-GPTDataset-train-{name}.npy").is_file()
    assert first.cache.built
    second = GPTDataset(ds, num_samples=20, config=cfg, split="train")
    assert not second.cache.built and isinstance(second.sample_index, np.memmap)
    np.testing.assert_array_equal(second.sample_index, first.sample_index)
    clone = pickle.loads(pickle.dumps(second))
    assert len(pickle.dumps(second)) < 4096 and isinstance(clone.shuffle_index, np.memmap)
    for i in range(len(second)):
        np.testing.assert_array_equal(clone[i]["input_ids"], second[i]["input_ids"])
    other = GPTDataset(ds, num_samples=20, config=GPTDatasetConfig(seq_length=8, seed=99), split="train")
    assert other.cache.built and len(list(cache_dir.glob("*-description.txt"))) == 2


def _build_in_child(prefix, cache_dir, barrier, queue):
    if barrier is not None:
        barrier.wait()
    gpt = GPTDataset(prefix, num_samples=300, config=GPTDatasetConfig(seq_length=16, seed=11, cache_dir=cache_dir))
    digest = hashlib.sha256(b"".join(gpt[i]["input_ids"].tobytes() for i in range(len(gpt)))).hexdigest()
    queue.put((os.getpid(), gpt.cache.built, digest))


def test_concurrent_build_one_builder_and_identical_results_across_processes(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix, num_docs=200, max_len=200)
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(4)
    procs = [
        ctx.Process(target=_build_in_child, args=(prefix, str(tmp_path / "shared"), barrier, queue)) for _ in range(4)
    ]
    # One more process with a cache of its own: a fresh build elsewhere must give the same samples.
    procs.append(ctx.Process(target=_build_in_child, args=(prefix, str(tmp_path / "alone"), None, queue)))
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(built for _, built, _ in results) == 2  # one in the shared cache, one in its own
    assert len({digest for _, _, digest in results}) == 1
    local = GPTDataset(
        prefix, num_samples=300, config=GPTDatasetConfig(seq_length=16, seed=11, cache_dir=str(tmp_path / "local"))
    )
    digest = hashlib.sha256(b"".join(local[i]["input_ids"].tobytes() for i in range(len(local)))).hexdigest()
    assert digest == results[0][2]


def test_config_validation():
    with pytest.raises(ValueError, match="seq_length must be positive, got 0"):
        GPTDatasetConfig(seq_length=0)
    with pytest.raises(ValueError, match="need the eod id"):
        GPTDatasetConfig(seq_length=4, eod_mask_loss=True)


def test_a_dataset_rewritten_in_place_with_the_same_counts_gets_fresh_indices(tmp_path):
    """Same sequence and token counts, other lengths: the cached indices of the old data must not be reused."""
    prefix = tmp_path / "d"
    cfg = GPTDatasetConfig(seq_length=4, seed=3)

    def write(lengths):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for n, length in enumerate(lengths):
                writer.add_document(np.arange(length) + 100 * n)

    write([2, 12, 3, 7, 6])
    old = GPTDataset(prefix, num_samples=6, config=cfg)
    write([6, 7, 3, 12, 2])
    rewritten = GPTDataset(prefix, num_samples=6, config=cfg)
    fresh = GPTDataset(prefix, num_samples=6, config=GPTDatasetConfig(seq_length=4, seed=3, cache_dir=str(tmp_path)))
    assert rewritten.cache.built and rewritten.cache.base != old.cache.base
    assert len(rewritten) == len(fresh)
    for i in range(len(fresh)):
        np.testing.assert_array_equal(rewritten[i]["input_ids"], fresh[i]["input_ids"])


@pytest.mark.parametrize("documents", [[], [[]]])
def test_an_empty_dataset_is_named_as_empty(tmp_path, documents):
    from megalith.data import build_gpt_datasets

    prefix = tmp_path / "empty"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in documents:
            writer.add_document(doc, [len(doc)] if doc else [])
    with pytest.raises(ValueError, match=rf"dataset .*empty is empty: .*empty.idx holds {len(documents)} documents"):
        build_gpt_datasets(str(prefix), "1", (10, None, None), GPTDatasetConfig(seq_length=4))


def test_reset_attention_mask_gives_each_sample_its_documents(tmp_path):
    """cu_seqlens of every item: a document starts after each EOD input, padded with S so items stack; the
    positions reset at the same places."""
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for length in (3, 7, 2, 9, 5, 4, 6):
            writer.add_document([*range(10, 10 + length - 1), EOD])
    cfg = GPTDatasetConfig(seq_length=8, seed=2, eod=EOD, reset_position_ids=True, reset_attention_mask=True,
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    gpt = GPTDataset(prefix, config=cfg)
    items = [gpt[i] for i in range(len(gpt))]
    for item in items:
        tokens = item["input_ids"].tolist()
        starts = [0] + [i + 1 for i, t in enumerate(tokens[:-1]) if t == EOD]
        bounds = item["cu_seqlens"]
        assert bounds.dtype == np.int32 and bounds.shape == (9,)
        assert bounds.tolist() == starts + [8] * (9 - len(starts))
        lengths = np.diff(np.unique(bounds)).tolist()
        assert item["position_ids"].tolist() == [p for n in lengths for p in range(n)]
    assert any(len(np.unique(item["cu_seqlens"])) > 2 for item in items)  # some samples hold several documents
    with pytest.raises(ValueError, match="need the eod id"):
        GPTDatasetConfig(seq_length=4, reset_attention_mask=True)
