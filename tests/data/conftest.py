"""Fixtures of the data tests: a small real corpus and locally trained tokenizer files (nothing downloaded)."""

from __future__ import annotations

import base64
import json

import pytest

from megalith.data.corpus import write_stdlib_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """jsonl of 60 standard-library source files."""
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    write_stdlib_corpus(path, max_documents=60)
    return path


@pytest.fixture(scope="session")
def corpus_texts(corpus):
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines()]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, corpus_texts):
    from megalith.data.tokenizer_cli import train_bpe

    return train_bpe(corpus_texts[:20], 600, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory, hf_tokenizer_dir):
    """GPT-2's two-file format (`vocab.json`, `merges.txt` with its `#version` line) of the trained BPE."""
    model = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text())["model"]
    out = tmp_path_factory.mktemp("gpt2")
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out / "vocab.json", out / "merges.txt"


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory, corpus_texts):
    import sentencepiece

    out = tmp_path_factory.mktemp("spm")
    lines = [line for text in corpus_texts[:20] for line in text.splitlines() if line.strip()][:3000]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tiny"),
        vocab_size=400,
        byte_fallback=True,
        model_type="bpe",
        pad_id=3,
        minloglevel=2,
        num_threads=1,
    )
    return out / "tiny.model"


@pytest.fixture(scope="session")
def tiktoken_file(tmp_path_factory):
    """A byte-level BPE ranks file: the 256 bytes, then a few merges (each merge's parts ranked before it)."""
    merges = [b"  ", b"    ", b"de", b"def", b"in", b"th", b"the", b"re", b"ret", b"return", b"se", b"self"]
    ranks = [bytes([b]) for b in range(256)] + merges
    path = tmp_path_factory.mktemp("tiktoken") / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(ranks)))
    return path
