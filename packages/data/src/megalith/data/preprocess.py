"""`megalith-preprocess`: tokenizes jsonl / jsonl.gz / text files into Megatron-format `.bin/.idx` datasets.

Input is read in chunks of consecutive lines; `--workers N` worker processes tokenize chunks (each with its
tokenizer's batch encoder) while the main process reads ahead a bounded number of chunks and writes results
in input order, so the output bytes do not depend on N and memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from megalith.data.indexed import IndexedDatasetWriter, optimal_dtype
from megalith.data.inputs import Chunk, expand_inputs, iter_chunks, parse_json_line
from megalith.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

__all__ = ["PreprocessError", "PreprocessStats", "main", "output_prefix", "preprocess"]


class PreprocessError(ValueError):
    """A bad input line (with `--on-bad-line error`); the message starts with `file:line:`."""


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


@dataclass
class _ChunkResult:
    seq: int
    path: str
    documents: int
    input_bytes: int
    bad: list[tuple[int, str]]
    # key -> (tokens, sequence lengths, sequences per document)
    per_key: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming: `{prefix}_{key}_document` (the `.bin/.idx` pair of one JSON key)."""
    return f"{prefix}_{key}_document"


# Per-process encoder state, set by _init_worker (module-level so pool workers can reach it).
_STATE: dict = {}


def _init_worker(tokenizer_spec, keys, append_eod, dtype, stop_at_bad_line, in_pool) -> None:
    if in_pool:
        # The parent handles Ctrl-C and termination; workers are stopped by it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # One thread per worker: parallelism comes from the worker processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    type_, path, vocab_size = tokenizer_spec
    _STATE.update(
        tokenizer=build_tokenizer(type_, path, vocab_size=vocab_size),
        keys=list(keys),
        append_eod=append_eod,
        dtype=np.dtype(dtype),
        stop_at_bad_line=stop_at_bad_line,
    )


def _records(chunk: Chunk, keys, bad, stop_at_bad_line) -> list[dict]:
    if not chunk.jsonl:
        text = chunk.payload.decode("utf-8", errors="replace")
        return [dict.fromkeys(keys, text)]
    records = []
    lines = chunk.payload.split(b"\n")
    for offset, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(parse_json_line(line, keys))
        except ValueError as exc:
            bad.append((chunk.first_line + offset, str(exc)))
            if stop_at_bad_line:
                break
            continue
        records[-1]["_line"] = chunk.first_line + offset
    return records


def _encode_key(tokenizer, records, key):
    """Batch-encodes one key of every record: (encoded pieces, None), or (None, (record index, error))."""
    pieces = [p for r in records for p in (r[key] if isinstance(r[key], list) else [r[key]])]
    try:
        return (tokenizer.encode_batch(pieces) if pieces else []), None
    except Exception:
        pass
    for index, record in enumerate(records):
        value = record[key]
        try:
            tokenizer.encode_batch(value if isinstance(value, list) else [value])
        except Exception as exc:
            return None, (index, exc)
    raise RuntimeError(f"the tokenizer failed on a batch of key {key!r} but on none of its records")


def _encode_chunk(chunk: Chunk) -> _ChunkResult:
    tokenizer, keys, dtype = _STATE["tokenizer"], _STATE["keys"], _STATE["dtype"]
    stop = _STATE["stop_at_bad_line"]
    bad: list[tuple[int, str]] = []
    records = _records(chunk, keys, bad, stop)
    while True:
        per_key, failed = {}, None
        for key in keys:
            encoded, failed = _encode_key(tokenizer, records, key)
            if failed is not None:
                index, exc = failed
                bad.append((records[index].get("_line", 1), f"tokenizer failed on key {key!r}: {exc}"))
                records.pop(index)
                break
            counts = [len(r[key]) if isinstance(r[key], list) else 1 for r in records]
            per_key[key] = _pack(encoded, counts, tokenizer.eod if _STATE["append_eod"] else None, dtype)
        if failed is None or stop:
            break
    bad.sort()
    if bad and stop:
        return _ChunkResult(chunk.seq, chunk.path, 0, len(chunk.payload), bad, {})
    return _ChunkResult(chunk.seq, chunk.path, len(records), len(chunk.payload), bad, per_key)


def _pack(encoded: list[list[int]], counts: list[int], eod: int | None, dtype) -> tuple:
    """Flattens encoded pieces into (tokens, sequence lengths, sequences per document).

    Empty pieces are dropped (a document can end up with no sequence at all, as in Megatron-LM); with `eod`,
    the EOD id is appended to the last sequence of every non-empty document.
    """
    parts: list[list[int]] = []
    lengths: list[int] = []
    per_doc: list[int] = []
    position = 0
    for count in counts:
        doc_pieces = [p for p in encoded[position : position + count] if p]
        position += count
        parts.extend(doc_pieces)
        lengths.extend(len(p) for p in doc_pieces)
        if doc_pieces and eod is not None:
            parts.append([eod])
            lengths[-1] += 1
        per_doc.append(len(doc_pieces))
    total = sum(lengths)
    tokens = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=total)
    if total and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise ValueError(f"token ids in [{tokens.min()}, {tokens.max()}] do not fit {np.dtype(dtype).name}")
    return tokens.astype(dtype), np.asarray(lengths, np.int64), np.asarray(per_doc, np.int64)


def _ordered_results(chunks, workers: int, init_args):
    """Encoded chunks in input order, from `workers` processes with a bounded number in flight."""
    if workers == 1:
        _init_worker(*init_args, in_pool=False)
        yield from map(_encode_chunk, chunks)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(*init_args, True))
    try:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


class _Progress:
    """A progress bar on a terminal, plain lines every `interval` documents otherwise."""

    def __init__(self, interval: int, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = max(1, interval)
        self.start = time.perf_counter()
        self._next_doc = self.interval
        self._last_draw = 0.0

    def update(self, stats: PreprocessStats) -> None:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"{stats.documents:,} docs  {stats.tokens:,} tokens  {stats.documents / elapsed:,.0f} docs/s  "
            f"{stats.input_bytes / elapsed / 1e6:.2f} MB/s"
        )
        if self.tty:
            if now - self._last_draw >= 0.1:
                self.stream.write(f"\r[{elapsed:7.1f} s] {line}")
                self.stream.flush()
                self._last_draw = now
        elif stats.documents >= self._next_doc:
            self.stream.write(f"[{elapsed:.1f} s] {line}\n")
            self._next_doc = (stats.documents // self.interval + 1) * self.interval

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def preprocess(
    inputs,
    output_prefix_: str,
    tokenizer_type: str,
    tokenizer_model=None,
    *,
    json_keys=("text",),
    append_eod: bool = False,
    workers: int = 1,
    on_bad_line: str = "error",
    vocab_size: int | None = None,
    log_interval: int = 10000,
    chunk_bytes: int = 1 << 20,
    progress_stream=None,
) -> PreprocessStats:
    """Tokenizes `inputs` into one dataset per JSON key; see the module docstring. Returns the counts."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    start = time.perf_counter()
    files = expand_inputs(inputs)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size=vocab_size)
    dtype = optimal_dtype(tokenizer.vocab_size)
    stats = PreprocessStats(outputs=[output_prefix(output_prefix_, key) for key in json_keys])
    writers = [IndexedDatasetWriter(prefix, dtype) for prefix in stats.outputs]
    progress = _Progress(log_interval, progress_stream)
    init_args = ((tokenizer_type, tokenizer_model, vocab_size), json_keys, append_eod, dtype, on_bad_line == "error")
    results = _ordered_results(iter_chunks(files, chunk_bytes), workers, init_args)
    try:
        for result in results:
            if result.bad and on_bad_line == "error":
                line, reason = result.bad[0]
                raise PreprocessError(f"{result.path}:{line}: {reason} (use --on-bad-line skip to skip such lines)")
            stats.bad_lines += len(result.bad)
            stats.documents += result.documents
            stats.input_bytes += result.input_bytes
            for writer, key in zip(writers, json_keys, strict=True):
                if key in result.per_key:
                    tokens, lengths, per_doc = result.per_key[key]
                    writer.add_documents(tokens, lengths, per_doc)
                    stats.tokens += len(tokens)
            progress.update(stats)
        for writer in writers:
            writer.finalize()
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    finally:
        results.close()  # stops the worker pool now, not when the traceback is freed
        progress.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="megalith-preprocess",
        description="Tokenize jsonl / jsonl.gz / text files into Megatron-format {prefix}_{key}_document.bin/.idx.",
    )
    parser.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl, .jsonl.gz, text files)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    parser.add_argument("--append-eod", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    parser.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            args.tokenizer_model,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            on_bad_line=args.on_bad_line,
            vocab_size=args.vocab_size,
            log_interval=args.log_interval,
        )
    except (PreprocessError, FileNotFoundError, ValueError) as exc:
        print(f"megalith-preprocess: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"megalith-preprocess: interrupted ({exc or 'Ctrl-C'}); no output was written", file=sys.stderr)
        return 130
    rate = stats.input_bytes / max(stats.seconds, 1e-9) / 1e6
    print(
        f"done: {stats.documents:,} documents, {stats.tokens:,} tokens, {stats.bad_lines} bad lines skipped, "
        f"{stats.input_bytes / 1e6:.1f} MB in {stats.seconds:.2f} s ({rate:.2f} MB/s)"
    )
    for prefix in stats.outputs:
        print(f"wrote {prefix}.bin / {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
