"""Every tokenizer type through the one interface, from locally made files; the trained BPE loads in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megalith.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

SAMPLE = "def main(self):\n    return self.value  # naïve café ✓\n"


@pytest.fixture
def tokenizers(hf_tokenizer_dir, sentencepiece_model, tiktoken_file):
    return {
        "HuggingFaceTokenizer": build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir),
        "TikTokenizer": build_tokenizer("TikTokenizer", tiktoken_file),
        "SentencePieceTokenizer": build_tokenizer("SentencePieceTokenizer", sentencepiece_model),
        "ByteTokenizer": build_tokenizer("ByteTokenizer"),
    }


def test_every_type_round_trips_text_and_has_distinct_special_ids(tokenizers):
    assert set(tokenizers) | {"NullTokenizer"} == set(TOKENIZER_TYPES)
    for name, tok in tokenizers.items():
        ids = tok.encode(SAMPLE)
        assert ids and all(0 <= i < tok.vocab_size for i in ids), name
        assert tok.eod not in ids and 0 <= tok.eod < tok.vocab_size and 0 <= tok.pad < tok.vocab_size, name
        text = tok.decode(ids)
        # SentencePiece normalises whitespace runs; every other type is lossless.
        if name == "SentencePieceTokenizer":
            assert text.split() == SAMPLE.split(), name
        else:
            assert text == SAMPLE, name
        assert tok.encode_batch([SAMPLE, "", "x"]) == [ids, tok.encode(""), tok.encode("x")], name


def test_specific_ids(tokenizers, tiktoken_file):
    byte = tokenizers["ByteTokenizer"]
    assert byte.encode("é") == [0xC3, 0xA9] and (byte.eod, byte.pad, byte.vocab_size) == (256, 257, 258)
    tik = tokenizers["TikTokenizer"]
    # Merges from the ranks file are applied: "self" and "return" are single ranks 267 and 265.
    assert tik.encode("self") == [267] and tik.encode("return") == [265]
    assert (tik.eod, tik.pad, tik.vocab_size) == (268, 269, 270)
    hf = tokenizers["HuggingFaceTokenizer"]
    assert (hf.eod, hf.pad, hf.vocab_size) == (0, 1, 600)
    sp = tokenizers["SentencePieceTokenizer"]
    assert (sp.eod, sp.pad, sp.vocab_size) == (2, 3, 400)


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.encode("3 14 15 92") == [3, 14, 15, 92] and tok.decode([3, 14]) == "3 14"
    assert (tok.eod, tok.pad, tok.vocab_size) == (100, 101, 102)
    with pytest.raises(ValueError, match="id 100 is outside"):
        tok.encode("1 100")
    with pytest.raises(ValueError, match="space-separated integers"):
        tok.encode("1 x")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer type 'GPT9'"):
        build_tokenizer("GPT9")
    with pytest.raises(FileNotFoundError, match=r"SentencePieceTokenizer model file .*missing\.model does not exist"):
        build_tokenizer("SentencePieceTokenizer", tmp_path / "missing.model")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("QQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2: expected 'base64-token rank'"):
        build_tokenizer("TikTokenizer", bad)
    with pytest.raises(ValueError, match="NullTokenizer needs a positive vocab_size"):
        build_tokenizer("NullTokenizer")


def test_tokenizer_train_cli_output_loads_in_transformers(tmp_path, corpus):
    out = tmp_path / "tok"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megalith.data.tokenizer_cli",
            "train",
            "--input",
            str(corpus),
            "--vocab-size",
            "500",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    ours = build_tokenizer("HuggingFaceTokenizer", out)
    assert hf.vocab_size == ours.vocab_size == 500
    assert hf.eos_token_id == ours.eod and hf.pad_token_id == ours.pad
    assert hf.encode(SAMPLE, add_special_tokens=False) == ours.encode(SAMPLE)
    assert hf.decode(ours.encode(SAMPLE)) == SAMPLE
