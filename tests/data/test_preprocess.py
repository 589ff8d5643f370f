"""megalith-preprocess: contents match the tokenizer, bytes do not depend on --workers, bad lines, interruption."""

from __future__ import annotations

import errno
import gzip
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megalith.data import IndexedDataset
from megalith.data.encoding import ChunkEncoder
from megalith.data.inputs import iter_chunks
from megalith.data.preprocess import PreprocessError, _pooled, main, preprocess
from megalith.data.tokenizers import ByteTokenizer, build_tokenizer


def _files(prefix):
    return {ext: open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx")}


def test_workers_1_and_4_write_identical_bytes_that_match_the_tokenizer(
    tmp_path, corpus, corpus_texts, hf_tokenizer_dir
):
    outputs = {}
    # auto picks threads for this tokenizer; "process" forces worker processes; the chunk sizes put several
    # documents in a chunk, and one document in several reads.
    # A gzip copy goes to the processes as bytes; the plain file as (offset, size), read by the workers.
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(corpus.read_bytes()))
    runs = [(1, "auto", 100_000), (4, "auto", 100_000), (4, "process", 100_000), (3, "thread", 7_000)]
    runs += [(2, "process", 30_000, gz)]
    for workers, kind, chunk_bytes, *source in runs:
        stats = preprocess(
            source or [corpus],
            str(tmp_path / f"w{workers}{kind}"),
            "HuggingFaceTokenizer",
            hf_tokenizer_dir,
            append_eod=True,
            workers=workers,
            chunk_bytes=chunk_bytes,
            worker_kind=kind,
        )
        assert stats.documents == len(corpus_texts) and stats.bad_lines == 0
        outputs[workers, kind] = _files(tmp_path / f"w{workers}{kind}_text_document")
    assert all(output == outputs[1, "auto"] for output in outputs.values())
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    ds = IndexedDataset(tmp_path / "w1auto_text_document")
    assert ds.dtype == np.uint16 and len(ds) == len(corpus_texts)
    for i, text in enumerate(corpus_texts):
        assert ds[i].tolist() == [*tok.encode(text), tok.eod]


def test_keys_lists_gz_and_text_inputs(tmp_path):
    lines = [
        {"text": "1 2 3", "title": "9"},
        {"text": ["4 5", "", "6"], "title": "8 8"},  # a list: one sequence per non-empty piece
        {"text": "", "title": "7"},  # empty: a document without sequences
    ]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "b.txt").write_text("10 11\n12")
    rc = main(
        [
            "--input",
            str(tmp_path / "a.jsonl.gz"),
            str(tmp_path / "*.txt"),
            "--output-prefix",
            str(tmp_path / "out"),
            "--json-keys",
            "text",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "50",
            "--append-eod",
        ]
    )
    assert rc == 0
    text = IndexedDataset(tmp_path / "out_text_document")
    assert [s.tolist() for s in text[0 : len(text)]] == [[1, 2, 3, 50], [4, 5], [6, 50], [10, 11, 12, 50]]
    assert text.document_indices.tolist() == [0, 1, 3, 3, 4]
    rc = main(
        [
            "--input",
            str(tmp_path / "a.jsonl.gz"),
            "--output-prefix",
            str(tmp_path / "out"),
            "--json-keys",
            "text",
            "title",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "70000",
            "--force",  # out_text_document exists from the run above
        ]
    )
    title = IndexedDataset(tmp_path / "out_title_document")
    assert rc == 0 and title.dtype == np.int32  # vocabulary of 65,500 or more: int32 tokens
    assert [s.tolist() for s in title[0:3]] == [[9], [8, 8], [7]]


def _bad_input(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "1 2"}\n{"text": 3}\nnot json\n{"other": "1"}\n{"text": "4 999"}\n{"text": "5"}\n')
    return path


def test_bad_lines_error_names_file_and_line_and_leaves_nothing(tmp_path, capsys):
    path = _bad_input(tmp_path)
    with pytest.raises(PreprocessError, match=r"in.jsonl:2: key 'text' holds int, not a string"):
        preprocess([path], str(tmp_path / "out"), "NullTokenizer", vocab_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    rc = main(
        [
            "--input",
            str(path),
            "--output-prefix",
            str(tmp_path / "out"),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "100",
            "--workers",
            "2",
        ]
    )
    assert rc == 2 and "in.jsonl:2:" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_bad_lines_skip_counts_them(tmp_path, capsys, kind):
    path = _bad_input(tmp_path)
    rc = main(
        [
            "--input",
            str(path),
            "--output-prefix",
            str(tmp_path / "out"),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "100",
            "--on-bad-line",
            "skip",
            "--workers",
            "2",
            "--worker-kind",
            kind,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "2 documents" in out and "4 bad lines skipped" in out
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert [s.tolist() for s in ds[0:2]] == [[1, 2], [5]]


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("chunk_bytes", [5, 40, 1 << 20])
def test_bad_line_numbers_do_not_depend_on_chunking(tmp_path, kind, chunk_bytes):
    # The tokenizer rejects line 7 (id 999 >= vocab 100); JSON is bad on line 9. Lines 3 and 8 are blank.
    lines = ['{"text": "1 2"}', '{"text": "3"}', "", '{"text": "4 5 6"}'] + ['{"text": "7"}'] * 2
    lines += ['{"text": "8 999"}', "", "{bad", '{"text": "9"}']
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines))  # no final newline
    kwargs = dict(vocab_size=100, workers=2, chunk_bytes=chunk_bytes, worker_kind=kind)
    with pytest.raises(PreprocessError, match=r"in.jsonl:7: tokenizer failed on key 'text'"):
        preprocess([path], str(tmp_path / "e"), "NullTokenizer", **kwargs)
    stats = preprocess([path], str(tmp_path / "s"), "NullTokenizer", on_bad_line="skip", **kwargs)
    assert (stats.documents, stats.bad_lines, stats.input_bytes) == (6, 2, path.stat().st_size)
    ds = IndexedDataset(tmp_path / "s_text_document")
    assert [s.tolist() for s in ds[0 : len(ds)]] == [[1, 2], [3], [4, 5, 6], [7], [7], [9]]


def test_sigterm_leaves_no_output_under_final_names(tmp_path):
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megalith.data.preprocess",
            "--input",
            str(fifo),
            "--output-prefix",
            str(tmp_path / "out"),
            "--tokenizer-type",
            "ByteTokenizer",
        ],
        stderr=subprocess.PIPE,
    )
    with open(fifo, "w") as writer:
        writer.write('{"text": "some text"}\n' * 100)
        writer.flush()
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("out_text_document.bin.tmp") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "preprocess did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"no output was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("kind", ["TikTokenizer", "SentencePieceTokenizer", "ByteTokenizer"])
def test_other_tokenizer_types_through_the_command(tmp_path, kind, corpus_texts, sentencepiece_model, tiktoken_file):
    model = {"TikTokenizer": tiktoken_file, "SentencePieceTokenizer": sentencepiece_model}.get(kind)
    texts = corpus_texts[:6]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in texts))
    args = ["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", kind, "--workers", "2"]
    assert main([*args, "--tokenizer-model", str(model)] if model else args) == 0
    tok = build_tokenizer(kind, model)
    ds = IndexedDataset(tmp_path / "o_text_document")
    assert [s.tolist() for s in ds[0 : len(ds)]] == [tok.encode(t[:3000]) for t in texts]


def test_gpt2_bpe_with_megatron_flags_matches_the_same_bpe_as_tokenizer_json(
    tmp_path, corpus, hf_tokenizer_dir, gpt2_files
):
    """Megatron-LM's GPT-2 recipe flags (--vocab-file/--merge-file) write the bytes the same BPE writes from its
    tokenizer.json (both byte-level, no prefix space, eod <|endoftext|>)."""
    vocab, merges = gpt2_files
    common = ["--input", str(corpus), "--append-eod", "--workers", "2"]
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file", str(merges)]
    assert main([*common, *gpt2, "--worker-kind", "process", "--output-prefix", str(tmp_path / "gpt2")]) == 0
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_tokenizer_dir)]
    assert main([*common, *hf, "--worker-kind", "thread", "--output-prefix", str(tmp_path / "hf")]) == 0
    assert _files(tmp_path / "gpt2_text_document") == _files(tmp_path / "hf_text_document")


def test_spawned_workers_build_the_tokenizer_from_its_options(tmp_path, corpus, gpt2_files, monkeypatch):
    """Where fork is missing (macOS, Windows) workers are spawned and rebuild the tokenizer from the options the
    parent was given (here GPT-2's two files); the output is the forked workers' output."""
    vocab, merges = gpt2_files
    options = dict(append_eod=True, workers=2, worker_kind="process", vocab_file=vocab, merge_file=merges)
    preprocess([corpus], str(tmp_path / "fork"), "GPT2BPETokenizer", **options)
    monkeypatch.setattr("megalith.data.preprocess.mp.get_all_start_methods", lambda: ["spawn"])
    preprocess([corpus], str(tmp_path / "spawn"), "GPT2BPETokenizer", **options)
    assert _files(tmp_path / "spawn_text_document") == _files(tmp_path / "fork_text_document")


@pytest.mark.parametrize("chunk_bytes", [1, 3, 16, 1000])
def test_chunks_are_whole_lines_with_their_first_line_numbers(tmp_path, chunk_bytes):
    rng = np.random.default_rng(chunk_bytes)
    lines = [b"x" * int(n) for n in rng.integers(0, 40, size=50)]
    data = b"\n".join(lines) + b"\r\n" + b"tail-without-newline"
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    chunks = list(iter_chunks([str(path)], chunk_bytes))
    assert b"".join(c.payload for c in chunks) == data
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(chunk.payload.endswith(b"\n") for chunk in chunks[:-1])
    offsets = np.cumsum([0] + [len(c.payload) for c in chunks[:-1]])
    assert [c.first_line for c in chunks] == [1 + data[: int(o)].count(b"\n") for o in offsets]
    assert [c.offset for c in chunks] == offsets.tolist()
    with pytest.raises(ValueError, match="chunk_bytes"):
        next(iter_chunks([str(path)], 0))


class _FailingTokenizer(ByteTokenizer):
    """Byte tokenizer that breaks a worker on the text "boom": by raising outside the bad-line path, or by dying."""

    def __init__(self, how: str) -> None:
        self.how = how

    def encode_batch(self, texts):
        if "boom" in texts:
            if self.how == "die":
                os._exit(3)
            raise KeyError("the tokenizer broke")  # not a bad line: a failure of the run
        return super().encode_batch(texts)

    def ids_of(self, deferred):
        if deferred is None:
            raise KeyError("the tokenizer broke")
        return deferred

    def encode_batch_deferred(self, texts):
        try:
            return self.encode_batch(texts)
        except KeyError:
            return None


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="the fake tokenizer needs fork")
@pytest.mark.parametrize("how", ["raise", "die"])
def test_a_failing_worker_process_stops_the_run_with_its_error(tmp_path, how):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b", "boom", "c"] * 3))
    encoder = ChunkEncoder(_FailingTokenizer(how), ["text"], False, np.uint16, True)
    expected = (KeyError, "the tokenizer broke") if how == "raise" else (RuntimeError, r"died \(exit code 3\)")
    with pytest.raises(expected[0], match=expected[1]):
        list(_pooled(encoder, iter_chunks([str(path)], 10), 2, None))
    assert multiprocessing.active_children() == []


def _args(inputs, prefix, *extra):
    return ["--input", *map(str, inputs), "--output-prefix", str(prefix), "--tokenizer-type", "ByteTokenizer", *extra]


def test_existing_outputs_need_force_and_an_input_is_never_an_output(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "abc"}\n')
    assert main(_args([data / "a.jsonl"], data / "out")) == 0
    before = _files(data / "out_text_document")
    (data / "a.jsonl").write_text('{"text": "xyz"}\n')
    assert main(_args([data / "a.jsonl"], data / "out")) == 2
    bin_path = data / "out_text_document.bin"
    assert capsys.readouterr().err == (
        f"megalith-preprocess: error: output {bin_path} already exists; pass --force to overwrite it\n"
    )
    assert _files(data / "out_text_document") == before
    assert main(_args([data / "a.jsonl"], data / "out", "--force")) == 0
    assert IndexedDataset(data / "out_text_document")[0].tolist() == list(b"xyz")
    # A glob over the folder takes in the previous output (as a text file): refused even with --force.
    capsys.readouterr()
    assert main(_args([data / "*"], data / "out", "--force")) == 2
    assert f"output {bin_path} is also an input ({bin_path})" in capsys.readouterr().err
    assert IndexedDataset(data / "out_text_document")[0].tolist() == list(b"xyz")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda good: good[: len(good) // 2], "truncated gzip file (it ends before the end-of-stream marker)"),
        (lambda good: b'{"text": "plain, not gzip"}\n', "not a gzip file (Not a gzipped file (b'{\"'))"),
        (lambda good: good[:20] + bytes(b ^ 0x55 for b in good[20:40]) + good[40:], "corrupt gzip data (Error -3"),
    ],
)
def test_a_damaged_gzip_input_is_a_one_line_error_naming_it(tmp_path, capsys, damage, message):
    good = gzip.compress("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000)).encode())
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(damage(good))
    assert main(_args([path], tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megalith-preprocess: error: {path}: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl.gz"]


@pytest.mark.parametrize(
    ("where", "code", "message"),
    [
        ("fsync", errno.ENOSPC, "no space left on {bin}"),
        ("open", errno.EROFS, "{bin} is on a read-only file system"),
        ("open", errno.EACCES, "permission denied: {bin}"),
    ],
)
def test_a_full_or_read_only_output_disk_is_a_one_line_error(tmp_path, capsys, monkeypatch, where, code, message):
    """The disk fills at the final flush (where delayed allocation reports it), or the output cannot be created."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "abc"}\n')

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(
        "megalith.data.indexed.os.fsync" if where == "fsync" else "megalith.data.indexed.open", fail, raising=False
    )
    assert main(_args([path], tmp_path / "out")) == 2
    expected = message.format(bin=tmp_path / "out_text_document.bin")
    assert capsys.readouterr().err == f"megalith-preprocess: error: {expected}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


class _Spy:
    """Wraps a tokenizer and records the longest text one encoder call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode_batch_deferred(self, texts):
        self.longest = max(self.longest, *map(len, texts))
        return self.tokenizer.encode_batch_deferred(texts)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_long_document_is_encoded_in_parts_with_the_ids_of_the_whole(tmp_path, corpus_texts, hf_tokenizer_dir, kind):
    text = "".join(corpus_texts[:40])
    path = tmp_path / "in.jsonl"
    lines = [{"text": "short one"}, {"text": text}, {"text": ["a list", text[:5000]]}, {"text": "end"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = dict(append_eod=True, workers=2, worker_kind=kind)
    preprocess([path], str(tmp_path / "whole"), "HuggingFaceTokenizer", hf_tokenizer_dir, piece_chars=10**9, **options)
    preprocess([path], str(tmp_path / "parts"), "HuggingFaceTokenizer", hf_tokenizer_dir, piece_chars=3000, **options)
    assert _files(tmp_path / "parts_text_document") == _files(tmp_path / "whole_text_document")
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert IndexedDataset(tmp_path / "parts_text_document")[1].tolist() == [*tok.encode(text), tok.eod]
    # The encoder never saw more than a part (plus the distance to the next cut point).
    spy = _Spy(tok)
    result = ChunkEncoder(spy, ["text"], True, np.uint16, True, piece_chars=3000)(next(iter_chunks([str(path)], 10**8)))
    assert 3000 <= spy.longest < 4000 < len(text) and result.documents == 4


def test_text_that_cannot_be_cut_is_limited_by_max_document_bytes(tmp_path, capsys, sentencepiece_model):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["short", "long text " * 200, "x" * 3000, "ok"]))
    sp = ["--tokenizer-model", str(sentencepiece_model)]
    args = ["--input", str(path), "--output-prefix", str(tmp_path / "o"), "--max-document-bytes", "1000"]
    assert main([*args, "--tokenizer-type", "SentencePieceTokenizer", *sp]) == 2
    assert capsys.readouterr().err == (
        f"megalith-preprocess: error: {path}:2: key 'text' holds a text of 2,000 bytes, more than "
        "--max-document-bytes 1,000 allows to encode at once (use --on-bad-line skip to skip such lines)\n"
    )
    assert main([*args, "--tokenizer-type", "SentencePieceTokenizer", *sp, "--on-bad-line", "skip"]) == 0
    out = capsys.readouterr().out
    assert "2 documents, " in out and "2 bad lines skipped" in out, out
    # A byte-level tokenizer cuts the spaced text, but not 3,000 bytes without a space.
    assert main([*args, "--tokenizer-type", "ByteTokenizer", "--force"]) == 2
    assert capsys.readouterr().err.startswith(
        f"megalith-preprocess: error: {path}:3: key 'text' holds a stretch without a cut point of 3,000 bytes"
    )
    assert main([*args, "--tokenizer-type", "ByteTokenizer", "--force", "--max-document-bytes", "0"]) == 0
    assert IndexedDataset(tmp_path / "o_text_document")[2].tolist() == [ord("x")] * 3000
