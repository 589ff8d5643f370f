"""Every tokenizer type through the one interface, from locally made files; the trained BPE loads in transformers."""

from __future__ import annotations

import json
import random
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


# Texts with every kind of boundary the pre-tokenizers treat specially: runs of spaces and newlines, tabs, digits
# (cl100k groups them by three), contractions, punctuation before newlines, non-ASCII letters and symbols.
_TRICKY = (
    "x = 12345678;\n\n    return  self.value  # naïve café ✓\r\n"
    "I'm sure they'll say it's 42, isn't it?  \t\n\n  x\n"
    "Straße über 東京 naïve 2024-01-01 (see: [a]).\n\t\tend.\n" * 3
)


def _llama3_style_tokenizer(tmp_path, corpus_texts):
    """A byte-level BPE whose pre-tokenizer is a Split on Llama-3's pattern followed by ByteLevel (no regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from megalith.data.tokenizers import TIKTOKEN_PATTERN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TIKTOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts[:20], trainer=trainer)
    tok.save(str(tmp_path / "llama3-style.json"))
    return build_tokenizer("HuggingFaceTokenizer", tmp_path / "llama3-style.json")


def test_long_texts_encode_in_parts_to_the_ids_of_the_whole(tokenizers, tmp_path, corpus_texts):
    from megalith.data.tokenizers import split_text

    text = _TRICKY + "".join(corpus_texts[20:30]) + _TRICKY
    kinds = {**tokenizers, "Llama-3-style split": _llama3_style_tokenizer(tmp_path, corpus_texts)}
    kinds["NullTokenizer"] = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert not kinds.pop("SentencePieceTokenizer").encodes_in_pieces  # its normalizer rewrites whitespace
    # Random strings over the characters the patterns treat differently, many cut points close together.
    rng = random.Random(0)
    alphabet = [*"  \n\n\t\r.,:;'\"!?-_()[]#0123456789aZxéß東✓🙂", "'s", "'ll", "\r\n"]
    text += "".join(rng.choice(alphabet) for _ in range(20_000))
    for name, tok in kinds.items():
        sample = " \n".join(str(i % 1000) for i in range(5000)) if name == "NullTokenizer" else text
        assert tok.encodes_in_pieces, name
        whole = tok.encode(sample)
        for size in (1, 7, 60, 1000):
            parts = split_text(sample, size)
            assert "".join(parts) == sample and len(parts) > len(sample) // (size + 200), (name, size)
            assert [i for part in tok.encode_batch(parts) for i in part] == whole, (name, size)


def test_hugging_face_layouts_that_could_change_ids_at_a_cut_are_encoded_whole(hf_tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    base = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    variants = {
        "normalizer": lambda t: setattr(t, "normalizer", normalizers.NFKC()),
        "prefix space": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "whitespace split": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.WhitespaceSplit()),
        "truncation": lambda t: t.enable_truncation(512),
    }
    for name, change in variants.items():
        tok = Tokenizer.from_str(base.to_str())
        change(tok)
        tok.save(str(tmp_path / f"{name}.json"))
        assert not build_tokenizer("HuggingFaceTokenizer", tmp_path / f"{name}.json").encodes_in_pieces, name
    assert build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir).encodes_in_pieces


def test_unreadable_tokenizer_files_name_the_file(tmp_path, hf_tokenizer_dir):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_bytes(b"\x00\xffnot json at all")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a Hugging Face tokenizer.json \("):
        build_tokenizer("HuggingFaceTokenizer", garbage)
    garbage.write_text('{"model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer.json: not a Hugging Face tokenizer.json \(.*line 1"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path)
    config = tmp_path / "cfg" / "tokenizer_config.json"
    config.parent.mkdir()
    (config.parent / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    config.write_text("{eos_token")
    with pytest.raises(ValueError, match=r"cfg/tokenizer_config.json: not a JSON file"):
        build_tokenizer("HuggingFaceTokenizer", config.parent)
    model = tmp_path / "bad.model"
    model.write_bytes(b"garbage\x00\xff")
    with pytest.raises(ValueError, match=r"bad.model: not a SentencePiece model \("):
        build_tokenizer("SentencePieceTokenizer", model)
    with pytest.raises(ValueError, match=r"bad.model: not a tiktoken ranks file \(not UTF-8"):
        build_tokenizer("TikTokenizer", model)


@pytest.mark.parametrize(
    ("kind", "module", "extra"),
    [("TikTokenizer", "tiktoken", "tiktoken"), ("SentencePieceTokenizer", "sentencepiece", "sentencepiece")],
)
def test_a_missing_tokenizer_library_names_the_pip_extra(monkeypatch, tmp_path, kind, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    (tmp_path / "model").write_text("")
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(
        ImportError, match=rf"{kind} needs the {module} library: pip install 'megalith-data\[{extra}\]'"
    ):
        build_tokenizer(kind, tmp_path / "model")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", kind]
    args += ["--tokenizer-model", str(tmp_path / "model")]
    script = f"import sys\nsys.modules[{module!r}] = None\nfrom megalith.data.preprocess import main\n"
    script += f"sys.exit(main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"megalith-preprocess: error: {kind} needs the {module} library: pip install 'megalith-data[{extra}]'\n"
    )


def test_hugging_face_tokenizers_is_a_dependency_of_megalith_data():
    """`pip install megalith-data` alone runs the documented default path (megalith-tokenizer train, HF)."""
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "packages/data/pyproject.toml").read_text())["project"]
    assert any(dep.replace(" ", "").startswith("tokenizers>=") for dep in project["dependencies"])


def _tokenizer_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "megalith.data.tokenizer_cli", "train", *map(str, args)], capture_output=True, text=True
    )


def test_tokenizer_train_errors_are_one_line_and_it_never_overwrites_silently(tmp_path, corpus):
    out = tmp_path / "tok"
    assert _tokenizer_cli("--input", corpus, "--vocab-size", 300, "--out", out).returncode == 0
    trained = (out / "tokenizer.json").read_bytes()
    again = _tokenizer_cli("--input", corpus, "--vocab-size", 400, "--out", out)
    assert again.returncode == 2
    expected = f"output {out / 'tokenizer_config.json'} already exists; pass --force to overwrite it"
    assert again.stderr == f"megalith-tokenizer: error: {expected}\n"
    assert (out / "tokenizer.json").read_bytes() == trained
    assert _tokenizer_cli("--input", corpus, "--vocab-size", 400, "--out", out, "--force").returncode == 0
    assert len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) == 400
    # An input among the outputs is refused even with --force.
    own = _tokenizer_cli("--input", out / "tokenizer.json", "--vocab-size", 300, "--out", out, "--force")
    assert own.returncode == 2 and "tokenizer.json is also an input" in own.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 5}\n')
    for args, message in [
        (["--input", tmp_path / "missing.jsonl"], "input '.*missing.jsonl' matches no file"),
        (["--input", bad], r".*bad.jsonl:2: key 'text' holds int, not a string"),
        (
            ["--input", corpus, "--vocab-size", 10],
            r"vocab_size must be at least 258 \(256 bytes \+ 2 special tokens\), got 10",
        ),
    ]:
        proc = _tokenizer_cli(
            *args, "--out", tmp_path / "other", *([] if "--vocab-size" in args else ["--vocab-size", 300])
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert re.fullmatch(f"megalith-tokenizer: error: {message}\n", proc.stderr), proc.stderr
