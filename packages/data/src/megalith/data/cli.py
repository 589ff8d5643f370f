"""`megalith-data`: build the embedded corpus, inspect and merge indexed datasets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megalith.data.corpus import write_stdlib_corpus
from megalith.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter
from megalith.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

__all__ = ["inspect_dataset", "main"]


def inspect_dataset(prefix, tokenizer=None, show: int = 1) -> str:
    """A human-readable summary of a dataset (and its first documents decoded when a tokenizer is given)."""
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
    for i in range(min(show, len(ds))):
        tokens = ds[i]
        head = tokens[:64]
        text = tokenizer.decode(head) if tokenizer is not None else " ".join(map(str, head.tolist()))
        lines.append(f"[{i}] {len(tokens)} tokens: {text!r}{' ...' if len(tokens) > 64 else ''}")
    return "\n".join(lines)


def _merge(inputs, output_prefix) -> int:
    prefixes = []
    for item in inputs:
        path = Path(item)
        prefixes += sorted(str(p)[:-4] for p in path.glob("*.idx")) if path.is_dir() else [item]
    if not prefixes:
        raise ValueError(f"no datasets found in {inputs}")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
    print(f"merged {len(prefixes)} datasets into {output_prefix}.bin / .idx")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalith-data", description="Megalith data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    corpus = commands.add_parser("corpus", help="write an embedded corpus as jsonl")
    corpus.add_argument("name", choices=["stdlib"], help="stdlib: this Python's standard-library sources")
    corpus.add_argument("--out", required=True)
    corpus.add_argument("--max-documents", type=int, default=None)
    inspect = commands.add_parser("inspect", help="summarise a .bin/.idx dataset")
    inspect.add_argument("prefix")
    inspect.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    inspect.add_argument("--tokenizer-model", default=None)
    inspect.add_argument("--vocab-size", type=int, default=None)
    inspect.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    inspect.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    inspect.add_argument("--show", type=int, default=1, help="documents to print")
    merge = commands.add_parser("merge", help="concatenate datasets (prefixes or directories) into one")
    merge.add_argument("--input", nargs="+", required=True)
    merge.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "corpus":
            info = write_stdlib_corpus(args.out, args.max_documents)
            print(f"wrote {info['documents']:,} documents ({info['bytes'] / 1e6:.1f} MB) to {info['path']}")
            return 0
        if args.command == "inspect":
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
        return _merge(args.input, args.output_prefix)
    except (IndexedDatasetError, FileNotFoundError, ValueError) as exc:
        print(f"megalith-data: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
