"""The .bin/.idx format: the worked example byte for byte, round trips, merging, and every malformed-file error."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from megalith.data import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter


def _expected_idx_bytes(code, lengths, itemsize, doc_indices):
    """The .idx layout spelled out field by field from the format reference (section 2.2)."""
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1] * itemsize]).astype("<i8") if lengths else []
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", len(lengths))
        + struct.pack("<Q", len(doc_indices))
        + np.asarray(lengths, "<i4").tobytes()
        + np.asarray(pointers, "<i8").tobytes()
        + np.asarray(doc_indices, "<i8").tobytes()
    )


def test_worked_82_byte_example(tmp_path):
    prefix = tmp_path / "example"
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([10, 11, 12])
    writer.add_document([20, 21, 22, 23, 24])
    writer.finalize()
    assert (tmp_path / "example.bin").read_bytes() == bytes.fromhex(
        "0A000B000C00140015001600170018 00".replace(" ", "")
    )
    idx = (tmp_path / "example.idx").read_bytes()
    assert len(idx) == 82
    assert idx == (
        bytes.fromhex("4D4D4944494458 0000".replace(" ", ""))
        + bytes.fromhex("0100000000000000")
        + b"\x08"
        + bytes.fromhex("0200000000000000")
        + bytes.fromhex("0300000000000000")
        + bytes.fromhex("0300000005000000")
        + bytes.fromhex("00000000000000000600000000000000")
        + bytes.fromhex("000000000000000001000000000000000200000000000000")
    )
    ds = IndexedDataset(prefix)
    assert [a.tolist() for a in ds[0:2]] == [[10, 11, 12], [20, 21, 22, 23, 24]]


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, 8), (np.int32, 4), (np.int64, 5), (np.uint8, 1)])
def test_round_trip_with_multi_sequence_and_empty_documents(tmp_path, dtype, code):
    rng = np.random.default_rng(0)
    high = min(np.iinfo(dtype).max, 50_000)
    documents = []
    for d in range(40):
        num = int(rng.integers(0, 4)) if d % 7 else 0  # some documents hold no sequence at all
        documents.append([rng.integers(0, high, size=int(rng.integers(0, 30))) for _ in range(num)])
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for d, sequences in enumerate(documents):
            if d % 2:
                writer.add_document(np.concatenate(sequences) if sequences else [], [len(s) for s in sequences])
            else:
                for s in sequences:
                    writer.add_item(s)
                writer.end_document()
    flat = [s for doc in documents for s in doc]
    lengths = [len(s) for s in flat]
    doc_indices = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])]).tolist()
    assert (tmp_path / "ds.idx").read_bytes() == _expected_idx_bytes(
        code, lengths, np.dtype(dtype).itemsize, doc_indices
    )
    assert (tmp_path / "ds.bin").read_bytes() == b"".join(np.asarray(s, dtype).tobytes() for s in flat)

    ds = IndexedDataset(prefix)
    assert len(ds) == len(flat) and ds.dtype == np.dtype(dtype)
    assert ds.sequence_lengths.tolist() == lengths
    assert ds.document_indices.tolist() == doc_indices
    for i, s in enumerate(flat):
        np.testing.assert_array_equal(ds[i], s)
    np.testing.assert_array_equal(ds[-1], flat[-1])
    for got, want in zip(ds[3:17], flat[3:17], strict=True):
        np.testing.assert_array_equal(got, want)
    long = max(range(len(flat)), key=lambda i: len(flat[i]))
    np.testing.assert_array_equal(ds.get(long, 2, 5), flat[long][2:7])
    np.testing.assert_array_equal(ds.get(long, 3), flat[long][3:])
    assert not ds[5].flags.writeable  # a view into the read-only map, not a copy
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 300 and clone.sequence_lengths.tolist() == lengths
    np.testing.assert_array_equal(clone[long], flat[long])
    with pytest.raises(IndexError, match="out of range"):
        ds[len(flat)]
    with pytest.raises(IndexError, match="outside sequence"):
        ds.get(long, 0, len(flat[long]) + 1)


def test_add_documents_and_add_index_merge(tmp_path):
    with IndexedDatasetWriter(tmp_path / "a", np.int32) as writer:
        writer.add_documents([1, 2, 3, 4, 5, 6], [2, 1, 3], [2, 0, 1])
    with IndexedDatasetWriter(tmp_path / "b", np.int32) as writer:
        writer.add_document([7, 8], [1, 1])
    with IndexedDatasetWriter(tmp_path / "m", np.int32) as writer:
        writer.add_index(tmp_path / "a")
        writer.add_index(tmp_path / "b")
    merged = IndexedDataset(tmp_path / "m")
    assert [s.tolist() for s in merged[0:5]] == [[1, 2], [3], [4, 5, 6], [7], [8]]
    assert merged.document_indices.tolist() == [0, 2, 2, 3, 5]
    with IndexedDatasetWriter(tmp_path / "c", np.uint16) as writer, pytest.raises(ValueError, match="int32 tokens"):
        writer.add_index(tmp_path / "a")


def test_nothing_appears_under_final_names_until_finalize(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    writer.add_document([1, 2, 3])
    assert not IndexedDataset.exists(tmp_path / "x")
    writer.finalize()
    assert IndexedDataset.exists(tmp_path / "x")
    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetWriter(tmp_path / "y", np.uint16) as writer:
        writer.add_document([1, 2])
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]
    with pytest.raises(ValueError, match=r"token ids in \[0, 70000\] do not fit the dataset dtype uint16"):
        IndexedDatasetWriter(tmp_path / "z", np.uint16).add_document([0, 70000])


@pytest.fixture
def good(tmp_path):
    prefix = tmp_path / "good"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
        writer.add_document([4, 5])
    return prefix


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda p: _patch(p.with_suffix(".idx"), 0, b"XXIDIDX"),
            r"good.idx: bad magic, expected b'MMIDIDX.*found b'XXIDIDX",
        ),
        (
            lambda p: _patch(p.with_suffix(".idx"), 9, struct.pack("<Q", 2)),
            r"good.idx: unknown version, expected 1, found 2",
        ),
        (
            lambda p: _patch(p.with_suffix(".idx"), 17, b"\x09"),
            r"good.idx: unknown dtype code, expected one of .*found 9",
        ),
        (
            lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-3]),
            r"good.idx: truncated index, expected 82 bytes for 2 sequences and 3 document indices, found 79",
        ),
        (
            lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:20]),
            r"good.idx: truncated index, expected at least a 34-byte header, found 20",
        ),
        (
            lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]),
            r"good.bin: size disagrees with .*good.idx: expected 10 bytes .*found 8 bytes",
        ),
        (
            lambda p: _patch(p.with_suffix(".idx"), 34 + 24 + 16, struct.pack("<q", 1)),
            r"good.idx: document_indices must start at 0 and end at sequence_count \(2\), found first/last \[0, 1\]",
        ),
    ],
)
def test_bad_files_name_the_file_and_the_difference(good, damage, message):
    damage(good)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(good)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.idx does not exist"):
        IndexedDataset(tmp_path / "nothing")
    assert not IndexedDataset.exists(tmp_path / "nothing")


@pytest.fixture
def three(tmp_path):
    """uint16 documents [1, 2, 3], [4, 5], [6]: lengths at 34, pointers at 46, document indices at 70."""
    prefix = tmp_path / "three"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in ([1, 2, 3], [4, 5], [6]):
            writer.add_document(doc)
    return prefix


_LENGTHS, _POINTERS, _DOCS = 34, 34 + 4 * 3, 34 + 12 * 3


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        (_LENGTHS + 4, struct.pack("<i", -2), r"three.idx: sequence 1 has a negative length \(-2\)"),
        (_POINTERS, struct.pack("<q", 2), r"three.idx: sequence 0 starts at byte 2, expected 0"),
        # A pointer outside the .bin, and one inside it that overlaps the previous sequence.
        (
            _POINTERS + 16,
            struct.pack("<q", 1 << 40),
            r"three.idx: sequence 2 starts at byte 1099511627776, expected 10 \(sequence 1 starts at byte 6 and "
            r"holds 2 tokens of 2 bytes\)",
        ),
        (_POINTERS + 8, struct.pack("<q", 4), r"three.idx: sequence 1 starts at byte 4, expected 6 "),
        # A huge last length, consistent with every pointer: the .bin is far too short for it.
        (
            _LENGTHS + 8,
            struct.pack("<i", 2**31 - 1),
            r"three.bin: size disagrees with .*three.idx: expected 4294967304 bytes .*found 12 bytes; "
            r"sequence 2 \(byte 10, 2147483647 tokens\) is the first to run past the end",
        ),
        (
            _DOCS + 8,
            struct.pack("<qq", 2, 1),
            r"three.idx: document_indices must not decrease: entry 2 is 1, after 2",
        ),
    ],
)
def test_bad_entries_name_the_file_and_the_first_bad_entry(three, offset, data, message):
    _patch(three.with_suffix(".idx"), offset, data)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(three)


def test_entries_are_checked_in_chunks(three, monkeypatch):
    """The check steps through the index in chunks; a bad entry in a later chunk is found at its own index."""
    monkeypatch.setattr("megalith.data.indexed._CHECK_CHUNK", 1)
    assert len(IndexedDataset(three)) == 3
    _patch(three.with_suffix(".idx"), _POINTERS + 16, struct.pack("<q", 12))
    with pytest.raises(IndexedDatasetError, match=r"sequence 2 starts at byte 12, expected 10"):
        IndexedDataset(three)


def test_content_key_follows_the_lengths_and_documents(tmp_path):
    keys = []
    for name, docs in (("a", [[1, 2], [3]]), ("b", [[7, 8], [9]]), ("c", [[1], [2, 3]]), ("d", [[1, 2, 3]])):
        with IndexedDatasetWriter(tmp_path / name, np.uint16) as writer:
            for doc in docs:
                writer.add_document(doc)
        keys.append(IndexedDataset(tmp_path / name).content_key)
    # The same layout with other tokens shares the key (indices depend on the layout only); any other layout not.
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
