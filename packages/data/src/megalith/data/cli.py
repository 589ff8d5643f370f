"""`megalith-data`: build the embedded corpus, inspect and merge indexed datasets."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from megalith.data.errors import refuse_overwrite, run_command, stop_on_sigterm
from megalith.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalith.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

__all__ = ["inspect_dataset", "main", "merge_inputs"]

_SHOWN_TOKENS = 64  # tokens of each shown sequence that inspect prints


def _decode_known(tokenizer, ids: np.ndarray) -> str:
    """Decodes ids, writing each id outside the tokenizer's vocabulary as <unknown id N> instead of dropping it."""
    unknown = (ids < 0) | (ids >= tokenizer.vocab_size)
    if not unknown.any():
        return tokenizer.decode(ids)
    text, start = [], 0
    for i in np.flatnonzero(unknown).tolist():
        if i > start:
            text.append(tokenizer.decode(ids[start:i]))
        text.append(f"<unknown id {int(ids[i])}>")
        start = i + 1
    text.append(tokenizer.decode(ids[start:]) if start < len(ids) else "")
    return "".join(text)


def inspect_dataset(prefix, tokenizer=None, show: int = 1) -> str:
    """A human-readable summary of a dataset (and its first documents decoded when a tokenizer is given)."""
    from megalith.data.vocabulary import token_id_range

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    lines = [
        f"dataset    {prefix}",
        f"dtype      {ds.dtype.name}",
        f"sequences  {len(ds):,}",
        f"documents  {len(ds.document_indices) - 1:,}",
        f"tokens     {ds.num_tokens:,}",
    ]
    if len(ds):
        lines.append(
            f"lengths    min {int(lengths.min()):,}  mean {float(lengths.mean()):,.1f}  max {int(lengths.max()):,}"
        )
    found = token_id_range(ds)
    if found is not None:
        line = f"ids        min {found[0]:,}  max {found[1]:,}"
        if tokenizer is not None:
            outside = found[0] < 0 or found[1] >= tokenizer.vocab_size
            line += f"  ({'NOT all' if outside else 'all'} within the tokenizer's {tokenizer.vocab_size:,} ids)"
        lines.append(line)
    for i in range(min(show, len(ds))):
        tokens = ds[i]
        head = tokens[:_SHOWN_TOKENS]
        text = _decode_known(tokenizer, head) if tokenizer is not None else " ".join(map(str, head.tolist()))
        more = " ..." if len(tokens) > _SHOWN_TOKENS else ""
        lines.append(f"[{i}] {len(tokens)} tokens: {text!r}{more}")
    return "\n".join(lines)


def merge_inputs(inputs) -> list[str]:
    """The dataset prefixes that merge inputs name, in order; every input must name at least one.

    An input is a dataset prefix when `input.bin` and `input.idx` exist, else a directory whose `*.idx` datasets
    it stands for (sorted). Training keeps its index caches in a folder named like the prefix
    (`prefix/cache/`), so a name that is both is ambiguous when that folder holds datasets of its own; a
    trailing "/" then picks the folder.
    """
    prefixes: list[str] = []
    for item in map(os.fspath, inputs):
        as_folder = sorted(str(p)[:-4] for p in Path(item).glob("*.idx")) if os.path.isdir(item) else []
        if IndexedDataset.exists(item) and not item.endswith(os.sep):
            if as_folder:
                raise ValueError(
                    f"merge input {item!r} is both a dataset ({item}.bin/.idx) and a folder holding "
                    f"{len(as_folder)} datasets; write {item + os.sep!r} for the folder"
                )
            prefixes.append(item)
        elif as_folder:
            prefixes += as_folder
        elif os.path.isdir(item):
            raise ValueError(f"merge input {item!r} is a folder without datasets (no *.idx files in it)")
        else:
            raise FileNotFoundError(f"merge input {item!r} names no dataset: {item}.bin / {item}.idx do not exist")
    return prefixes


def _merge(inputs, output_prefix, force: bool) -> int:
    prefixes = merge_inputs(inputs)
    sources = [prefix + ext for prefix in prefixes for ext in (".bin", ".idx")]
    refuse_overwrite([output_prefix + ".bin", output_prefix + ".idx"], sources, force)
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
    print(f"merged {len(prefixes)} datasets into {output_prefix}.bin / .idx")
    return 0


def _corpus(args) -> int:
    from megalith.data.corpus import write_stdlib_corpus

    refuse_overwrite([args.out], force=args.force)
    info = write_stdlib_corpus(args.out, args.max_documents)
    print(f"wrote {info['documents']:,} documents ({info['bytes'] / 1e6:.1f} MB) to {info['path']}")
    return 0


def _inspect(args) -> int:
    tokenizer = None
    if args.tokenizer_type:
        tokenizer = build_tokenizer(
            args.tokenizer_type,
            args.tokenizer_model,
            vocab_size=args.vocab_size,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
        )
    print(inspect_dataset(args.prefix, tokenizer, args.show))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalith-data", description="Megalith data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    corpus = commands.add_parser("corpus", help="write an embedded corpus as jsonl")
    corpus.add_argument("name", choices=["stdlib"], help="stdlib: this Python's standard-library sources")
    corpus.add_argument("--out", required=True)
    corpus.add_argument("--max-documents", type=int, default=None)
    corpus.add_argument("--force", action="store_true", help="replace an existing --out file")
    inspect = commands.add_parser("inspect", help="summarise a .bin/.idx dataset")
    inspect.add_argument("prefix")
    inspect.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    inspect.add_argument("--tokenizer-model", default=None)
    inspect.add_argument("--vocab-size", type=int, default=None)
    inspect.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    inspect.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    inspect.add_argument("--show", type=int, default=1, help="documents to print")
    merge = commands.add_parser("merge", help="concatenate datasets (prefixes or directories) into one")
    merge.add_argument(
        "--input", nargs="+", required=True, help="dataset prefixes, or folders of datasets (end with / to insist)"
    )
    merge.add_argument("--output-prefix", required=True)
    merge.add_argument("--force", action="store_true", help="replace an existing output dataset")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    if args.command == "corpus":
        return run_command("megalith-data", lambda: _corpus(args))
    if args.command == "inspect":
        return run_command("megalith-data", lambda: _inspect(args))
    return run_command("megalith-data", lambda: _merge(args.input, args.output_prefix, args.force))


if __name__ == "__main__":
    sys.exit(main())
