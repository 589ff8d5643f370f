"""Tokenizers behind one small interface: encode, decode, eod, pad, vocab_size (and encode_batch).

Every tokenizer reads local files only; nothing is fetched from a hub. The libraries (`tokenizers`, `tiktoken`,
`sentencepiece`) are imported when a tokenizer of that kind is built, so the package imports without them.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
from itertools import pairwise
from pathlib import Path

from megalith.data.errors import MissingPackageError

__all__ = [
    "TOKENIZER_TYPES",
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TikTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "cut_points",
    "split_text",
]

# Special tokens looked for, in order, when a tokenizer file does not say which one ends a document / pads.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer:
    """The interface every Megalith tokenizer implements."""

    #: a short string naming the tokenizer and its file; part of dataset cache keys.
    identifier: str
    #: True when `encode_batch_deferred` runs without holding the GIL, so threads encode in parallel.
    encodes_without_gil: bool = False
    #: True when the parts `split_text` cuts a text into (at `cut_points`) encode to exactly the ids of the whole
    #: text, so a long document can be encoded part by part in bounded memory.
    encodes_in_pieces: bool = False

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        """Id appended at the end of each document."""
        raise NotImplementedError

    @property
    def pad(self) -> int:
        """Id used to fill a short final sample (the loss is always masked there)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts; subclasses backed by a library with a batch encoder override this."""
        return [self.encode(text) for text in texts]

    def encode_batch_deferred(self, texts: list[str]):
        """Encodes many texts into the library's own result objects; `ids_of` turns them into id lists.

        The split lets preprocessing run the encoding (which the Rust-backed libraries do without holding the
        GIL) on one thread while another thread converts the previous batch into Python lists and arrays.
        """
        return self.encode_batch(texts)

    def ids_of(self, deferred) -> list[list[int]]:
        """The id lists of an `encode_batch_deferred` result (fresh lists the caller may modify)."""
        return deferred


# A cut point: just before a space that follows any other character than whitespace, or before a newline that
# follows a letter or digit ([^\W_] is exactly Unicode's L and N categories). No pre-token of the patterns these
# tokenizers use (GPT-2's, cl100k / Llama-3's, Qwen2's, whitespace splitting) holds such a pair: a space only
# ever starts a pre-token or sits in a run of whitespace, and only punctuation takes newlines after it (cl100k's
# ` ?[^\s\p{L}\p{N}]+[\r\n]*`). So every cut is a boundary between pre-tokens, the scan of the text after it
# starts where the scan of the whole text is, and the one lookahead (`\s+(?!\S)`) sees whitespace or the end
# of the text at the cut, which it treats alike.
_CUT = re.compile(r"\S(?= )|[^\W_](?=\n)")


def cut_points(text: str, max_chars: int) -> list[int]:
    """Where to cut `text` into consecutive parts of at least `max_chars` characters (the last may be shorter).

    Each cut lies at the first cut point (a space after a character other than whitespace, or a newline after a
    letter or digit) at least `max_chars` characters into the part; a text with no such point stays whole.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    cuts: list[int] = []
    start = 0
    while len(text) - start > max_chars:
        match = _CUT.search(text, start + max_chars - 1)
        if match is None:
            break
        start = match.end()
        cuts.append(start)
    return cuts


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` cut at `cut_points(text, max_chars)`; `"".join(split_text(text, n)) == text`."""
    bounds = [0, *cut_points(text, max_chars), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def _import(module: str, what: str, extra: str):
    """Imports an optional tokenizer library, or says which pip extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(what, module, extra) from None


def _require_file(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"{what} needs a model file (--tokenizer-model)")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} model file {path} does not exist")
    return path


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` model: a `tokenizer.json` file, or a directory holding one.

    The end-of-document and pad tokens come from `tokenizer_config.json` next to it when present
    (`eos_token` / `pad_token`), else from the usual special-token spellings; pad falls back to eod.
    """

    def __init__(self, model_path) -> None:
        library = _import("tokenizers", "HuggingFaceTokenizer", "hf")
        path = _require_file(model_path, "HuggingFaceTokenizer")
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"HuggingFaceTokenizer: {file} does not exist")
        config = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{config_file}: not a JSON file ({exc})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
        try:
            tok = library.Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises a bare Exception for every kind of bad file
            raise ValueError(f"{file}: not a Hugging Face tokenizer.json ({exc})") from None
        self._setup(tok, f"HuggingFaceTokenizer:{file.resolve()}", file, config)

    def _setup(self, tok, identifier: str, where, config: dict) -> None:
        self._tok = tok
        self.identifier = identifier
        self._eod = self._special(config.get("eos_token"), _EOD_CANDIDATES)
        if self._eod is None:
            raise ValueError(f"{where}: no end-of-document token found (looked for {', '.join(_EOD_CANDIDATES)})")
        pad = self._special(config.get("pad_token"), _PAD_CANDIDATES)
        self._pad = self._eod if pad is None else pad
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.encodes_without_gil = True
        self.encodes_in_pieces = _cuts_are_pre_token_boundaries(tok)

    def _special(self, configured, candidates) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for token in ([configured] if configured else []) + list(candidates):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.ids_of(self.encode_batch_deferred(texts))

    def encode_batch_deferred(self, texts: list[str]):
        return self._batch(texts, add_special_tokens=False)  # releases the GIL while it encodes

    def ids_of(self, deferred) -> list[list[int]]:
        return [encoding.ids for encoding in deferred]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2's byte-level BPE from its two original files, as Megatron-LM's `GPT2BPETokenizer` reads them.

    `vocab.json` maps byte-level token strings to ids and `merges.txt` lists the merges by priority (an optional
    `#version` first line). Text is split with GPT-2's pattern, without an added leading space; eod is the
    vocabulary's `<|endoftext|>`, which is also the pad id (GPT-2 has no pad token). As in Megatron-LM, an
    `<|endoftext|>` inside a document's text is encoded as ordinary text.
    """

    def __init__(self, vocab_file, merge_file) -> None:
        _import("tokenizers", "GPT2BPETokenizer", "hf")
        from tokenizers import Tokenizer as _HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab_path = _require_file(vocab_file, "GPT2BPETokenizer vocabulary (--vocab-file)")
        merges_path = _require_file(merge_file, "GPT2BPETokenizer merges (--merge-file)")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{vocab_path}: not a JSON vocabulary ({exc})") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{vocab_path}: expected a JSON object of token -> integer id")
        merges = []
        for number, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
            if (number == 1 and line.startswith("#version")) or not line.strip():
                continue
            pair = line.split(" ")
            if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
                raise ValueError(
                    f"{merges_path}:{number}: expected two vocabulary tokens whose concatenation is in "
                    f"{vocab_path.name}, found {line[:80]!r}"
                )
            merges.append((pair[0], pair[1]))
        tok = _HFTokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        identifier = f"GPT2BPETokenizer:{vocab_path.resolve()}:{merges_path.resolve()}"
        self._setup(tok, identifier, vocab_path, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
        if self._tok.id_to_token(self._eod) != "<|endoftext|>":
            raise ValueError(f"{vocab_path}: GPT2BPETokenizer needs <|endoftext|> in the vocabulary")


# GPT-2 / cl100k style pre-tokenization pattern (contractions, letters, numbers, punctuation, spaces).
TIKTOKEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# Split patterns for which every `_CUT` point is a pre-token boundary: cl100k and Llama-3's (TIKTOKEN_PATTERN)
# and Qwen2's (numbers one digit at a time).
_PIECEWISE_PATTERNS = frozenset({TIKTOKEN_PATTERN, TIKTOKEN_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")})


def _cuts_are_pre_token_boundaries(tok) -> bool:
    """Whether a Hugging Face tokenizer encodes `split_text`'s parts to the ids of the whole text.

    True for the layouts the argument at `_CUT` covers: no normalizer (it could join characters across a cut);
    GPT-2's byte-level pre-tokenizer, or a known split pattern followed by a byte-level step; a BPE without
    dropout; added tokens without whitespace that strip none; no truncation or padding.
    """
    if tok.normalizer is not None or tok.truncation is not None or tok.padding is not None:
        return False
    if type(tok.model).__name__ != "BPE" or tok.model.dropout not in (None, 0.0):
        return False
    for added in tok.get_added_tokens_decoder().values():
        if added.lstrip or added.rstrip or any(c.isspace() for c in added.content):
            return False
    if tok.pre_tokenizer is None:
        return False
    pre = json.loads(tok.pre_tokenizer.__getstate__())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False}
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) and pre.items() >= byte_level.items()
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return False
    split, last = steps
    return (
        split.get("type") == "Split"
        and split.get("pattern", {}).get("Regex") in _PIECEWISE_PATTERNS
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and last.items() >= {**byte_level, "use_regex": False}.items()
    )


class TikTokenizer(Tokenizer):
    """A tiktoken BPE from a local ranks file (lines of `base64(token) rank`, as `.tiktoken` files hold).

    Special tokens take the ids right after the ranks: `num_special_tokens` of them, the first being
    `<|endoftext|>` (eod) and the second `<|pad|>` (pad), the rest `<|special_K|>` placeholders.
    """

    def __init__(self, model_path, pattern: str = TIKTOKEN_PATTERN, num_special_tokens: int = 2) -> None:
        tiktoken = _import("tiktoken", "TikTokenizer", "tiktoken")
        path = _require_file(model_path, "TikTokenizer")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a tiktoken ranks file (not UTF-8 text: {exc})") from None
        ranks: dict[bytes, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: expected 'base64-token rank', found {line[:80]!r}") from exc
        if num_special_tokens < 2:
            raise ValueError(f"num_special_tokens must be at least 2 (eod and pad), got {num_special_tokens}")
        base = max(ranks.values()) + 1 if ranks else 0
        names = ["<|endoftext|>", "<|pad|>"] + [f"<|special_{k}|>" for k in range(2, num_special_tokens)]
        self._special_ids = {name: base + k for k, name in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=f"megalith-{path.stem}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self._special_ids
        )
        self.identifier = f"TikTokenizer:{path.resolve()}:{num_special_tokens}"
        self._threads = 1
        self.encodes_without_gil = True
        self.encodes_in_pieces = pattern in _PIECEWISE_PATTERNS

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eod(self) -> int:
        return self._special_ids["<|endoftext|>"]

    @property
    def pad(self) -> int:
        return self._special_ids["<|pad|>"]

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=self._threads)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file; eod is its `</s>` (eos) id, pad its pad id or else eod."""

    def __init__(self, model_path) -> None:
        sentencepiece = _import("sentencepiece", "SentencePieceTokenizer", "sentencepiece")
        path = _require_file(model_path, "SentencePieceTokenizer")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
        self.identifier = f"SentencePieceTokenizer:{path.resolve()}"
        if self._sp.eos_id() < 0:
            raise ValueError(f"{path}: the SentencePiece model has no end-of-sentence token (eos_id is -1)")
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: preprocessing parallelises over worker processes instead.
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then eod = 256 and pad = 257; needs no file."""

    identifier = "ByteTokenizer"
    encodes_in_pieces = True  # UTF-8 encodes characters one by one

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eod(self) -> int:
        return 256

    @property
    def pad(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class NullTokenizer(Tokenizer):
    """Text is already token ids separated by spaces (for tests); ids 0..vocab_size-1, then eod, then pad."""

    encodes_in_pieces = True  # every cut lies at whitespace, where the ids are split anyway

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs a positive vocab_size (--vocab-size), got {vocab_size}")
        self._n = int(vocab_size)
        self.identifier = f"NullTokenizer:{self._n}"

    @property
    def vocab_size(self) -> int:
        return self._n + 2

    @property
    def eod(self) -> int:
        return self._n

    @property
    def pad(self) -> int:
        return self._n + 1

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(piece) for piece in text.split()]
        except ValueError as exc:
            raise ValueError(f"NullTokenizer expects space-separated integers, got {text[:60]!r}") from exc
        bad = [i for i in ids if not 0 <= i < self._n]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} is outside [0, {self._n})")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "TikTokenizer",
    "SentencePieceTokenizer",
    "ByteTokenizer",
    "NullTokenizer",
)


def build_tokenizer(
    type: str, model_path=None, *, vocab_size: int | None = None, vocab_file=None, merge_file=None
) -> Tokenizer:
    """Builds a tokenizer by its Megatron-LM `--tokenizer-type` name.

    Args:
        type: one of `TOKENIZER_TYPES`.
        model_path: the tokenizer file (`tokenizer.json` or its directory, a tiktoken ranks file, a
            SentencePiece `.model`, a directory holding GPT-2's `vocab.json` and `merges.txt`); unused by
            ByteTokenizer and NullTokenizer.
        vocab_size: NullTokenizer only: the number of ordinary ids.
        vocab_file, merge_file: GPT2BPETokenizer only (Megatron-LM's `--vocab-file` / `--merge-file`); each
            defaults to `vocab.json` / `merges.txt` in the `model_path` directory.
    """
    model_path = os.fspath(model_path) if model_path is not None else None
    if type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(model_path)
    if type == "GPT2BPETokenizer":
        if (vocab_file is None or merge_file is None) and model_path is None:
            raise ValueError("GPT2BPETokenizer needs --vocab-file and --merge-file (or a --tokenizer-model folder)")
        folder = Path(model_path) if model_path is not None else None
        return GPT2BPETokenizer(
            vocab_file if vocab_file is not None else folder / "vocab.json",
            merge_file if merge_file is not None else folder / "merges.txt",
        )
    if type == "TikTokenizer":
        return TikTokenizer(model_path)
    if type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(model_path)
    if type == "ByteTokenizer":
        return ByteTokenizer()
    if type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown tokenizer type {type!r}; expected one of {', '.join(TOKENIZER_TYPES)}")


def tokenizer_from_folder(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved in `folder` (a checkpoint's `tokenizer/`), its kind recognised from the files:
    `tokenizer.json` (Hugging Face), `vocab.json` + `merges.txt` (GPT-2 BPE), one `*.model` (SentencePiece) or
    one `*.tiktoken` (tiktoken)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return build_tokenizer("HuggingFaceTokenizer", folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return build_tokenizer("GPT2BPETokenizer", folder)
    for suffix, kind in ((".model", "SentencePieceTokenizer"), (".tiktoken", "TikTokenizer")):
        files = sorted(folder.glob(f"*{suffix}"))
        if len(files) == 1:
            return build_tokenizer(kind, files[0])
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise ValueError(
        f"{folder}: cannot tell the tokenizer kind from its files {names} (expected tokenizer.json, vocab.json "
        "with merges.txt, one *.model or one *.tiktoken)"
    )
