"""Every tokenizer type through the one interface, from locally made files; the trained BPE loads in transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import pairwise

import pytest

from megalith.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

SAMPLE = "def main(self):\n    return self.value  # naïve café ✓\n"


@pytest.fixture
def tokenizers(hf_tokenizer_dir, sentencepiece_model, tiktoken_file, gpt2_files):
    vocab, merges = gpt2_files
    return {
        "HuggingFaceTokenizer": build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir),
        "GPT2BPETokenizer": build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges),
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes take
    the characters from U+0100 up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(0x100 + n)
    return table


# GPT-2's split pattern with stdlib `re` classes: letters [^\W\d_], numbers \d, other (?:[^\s\w]|_). It agrees
# with the \p{L} / \p{N} original on text whose digits are all decimal digits (the texts below).
_GPT2_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def _reference_gpt2_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """GPT-2 BPE, written from its description: split, map bytes to characters, merge the lowest-ranked pair."""
    table = _bytes_to_unicode()
    ids = []
    for piece in _GPT2_SPLIT.findall(text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best = min(pairwise(word), key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[token] for token in word)
    return ids


def test_gpt2_bpe_matches_a_reference_implementation(gpt2_files, corpus_texts):
    vocab_file, merges_file = gpt2_files
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(lines)}
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file.parent)  # the folder form finds both files
    texts = [t for t in corpus_texts[20:40] if t.isascii()]
    texts += [SAMPLE, "I'm sure they'll say it's 42, isn't it?  \t\n\n  x", "Straße über 東京 naïve", "a  b   c \n"]
    assert len(texts) > 10
    for text in texts:
        assert tok.encode(text) == _reference_gpt2_encode(text, vocab, ranks)
    assert tok.eod == vocab["<|endoftext|>"] == tok.pad
    # As in Megatron-LM, the end-of-text marker inside a text is ordinary text.
    assert tok.eod not in tok.encode("a<|endoftext|>b")


def test_gpt2_bpe_errors_name_the_file(tmp_path, gpt2_files):
    vocab_file, merges_file = gpt2_files
    with pytest.raises(ValueError, match="needs --vocab-file and --merge-file"):
        build_tokenizer("GPT2BPETokenizer")
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nzzzq qqqz\n")
    with pytest.raises(ValueError, match=r"merges.txt:2: expected two vocabulary tokens"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=bad_merges)
    bad_vocab = tmp_path / "vocab.json"
    bad_vocab.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"vocab.json: expected a JSON object"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=bad_vocab, merge_file=merges_file)
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    del vocab["<|endoftext|>"]
    bad_vocab.write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"vocab.json: no end-of-document token"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=bad_vocab, merge_file=merges_file)


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
