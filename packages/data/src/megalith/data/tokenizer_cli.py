"""`megalith-tokenizer train`: trains a byte-level BPE with Hugging Face `tokenizers` on local text."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from megalith.data.cache import make_shareable
from megalith.data.errors import names_file, refuse_overwrite, run_command, stop_on_sigterm
from megalith.data.inputs import expand_inputs, iter_texts

__all__ = ["main", "train_bpe"]

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# What train_bpe writes; tokenizer.json last, so a folder that has one is complete.
OUTPUT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def train_bpe(texts, vocab_size: int, out_dir, min_frequency: int = 2, *, force: bool = False) -> Path:
    """Trains a byte-level BPE on an iterable of strings and saves it as a Hugging Face tokenizer directory.

    The directory holds `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`, so both
    `HuggingFaceTokenizer(out_dir)` and `transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)` load it.
    `<|endoftext|>` (id 0) ends documents and `<|pad|>` (id 1) pads. Files already there are replaced only with
    `force` (checked before training).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
    refuse_overwrite([Path(out_dir) / name for name in OUTPUT_FILES], force=force)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "bos_token": EOD_TOKEN,
        "unk_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_prefix_space": False,
        "model_max_length": 1_000_000_000,
    }
    specials = {"eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN, "unk_token": EOD_TOKEN, "pad_token": PAD_TOKEN}
    files = {
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(specials, indent=2),
        "tokenizer.json": tokenizer.to_str(),
    }
    for name in OUTPUT_FILES:
        _write_atomic(out_dir / name, files[name])
    return out_dir


def _write_atomic(path: Path, text: str) -> None:
    with names_file(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        make_shareable(tmp)
        with names_file(path), os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalith-tokenizer", description="Tokenizer tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE on jsonl / jsonl.gz / text files")
    train.add_argument("--input", nargs="+", required=True, help="files or globs")
    train.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to train on (jsonl input)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--force", action="store_true", help="replace the tokenizer files already in --out")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    return run_command("megalith-tokenizer", lambda: _train(args))


def _train(args) -> int:
    start = time.perf_counter()
    files = expand_inputs(args.input)
    refuse_overwrite([Path(args.out) / name for name in OUTPUT_FILES], files, args.force)
    texts = iter_texts(files, args.json_keys)
    out = train_bpe(texts, args.vocab_size, args.out, args.min_frequency, force=args.force)
    print(
        f"trained a {args.vocab_size}-token byte-level BPE on {len(files)} file(s) in "
        f"{time.perf_counter() - start:.1f} s: {out / 'tokenizer.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
