"""`megalith-preprocess`: tokenizes jsonl / jsonl.gz / text files into Megatron-format `.bin/.idx` datasets.

Input is read in blocks of whole lines (chunks). Each chunk goes through three steps of
`megalith.data.encoding.ChunkEncoder`: `prepare` (split lines, parse JSON, collect the texts), `encode` (the
tokenizer's batch encoder) and `finish` (ids into one token array per key). Two ways to run them with
`--workers N`:

- threads, for tokenizers whose encoder runs without the GIL (Hugging Face `tokenizers`, tiktoken) and
  N <= MAX_THREAD_WORKERS: N threads only encode; the main thread reads, prepares the next chunks, finishes
  the previous ones and writes, so reading, parsing and writing hide behind the encoders and nothing is
  copied between processes;
- processes, otherwise: N processes run all three steps and the main process only finds chunk boundaries
  (workers read uncompressed files themselves) and writes.

Either way results are written in input order with a bounded number of chunks in flight: the output bytes do
not depend on N or on the way, and memory does not grow with the corpus, nor with one long document (see
`megalith.data.encoding`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from megalith.data.encoding import MAX_DOCUMENT_BYTES, PIECE_CHARS, ChunkEncoder, ChunkResult
from megalith.data.errors import names_file, refuse_overwrite, run_command, stop_on_sigterm
from megalith.data.indexed import IndexedDatasetWriter, optimal_dtype
from megalith.data.inputs import expand_inputs, iter_chunks
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


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming: `{prefix}_{key}_document` (the `.bin/.idx` pair of one JSON key)."""
    return f"{prefix}_{key}_document"


def _block_signals() -> None:
    """Encoding threads leave SIGINT / SIGTERM to the main thread, so they interrupt its blocking reads."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


# The main thread's share of the work (JSON, id lists, arrays) is about 5% of the BPE encoding time, so it keeps
# up with this many encoding threads with room to spare; more workers run as processes.
MAX_THREAD_WORKERS = 8


def _threaded(encoder: ChunkEncoder, chunks, workers: int):
    """`workers` threads encode; this thread prepares the next chunks and finishes the earlier ones meanwhile."""
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="megalith-encode", initializer=_block_signals) as threads:
        try:
            for chunk in chunks:
                prepared = encoder.prepare(chunk)
                pending.append((prepared, threads.submit(encoder.encode, prepared)))
                if len(pending) > 2 * workers:  # a slow chunk at the head leaves the others work to do
                    prepared, future = pending.popleft()
                    yield encoder.finish(prepared, future.result())
            while pending:
                prepared, future = pending.popleft()
                yield encoder.finish(prepared, future.result())
        finally:
            for _, future in pending:
                future.cancel()


def _worker_main(tasks, results, encoder, spec) -> None:
    """A worker process: chunks in, results out, until it reads None. Errors go back to the parent."""
    # The parent handles Ctrl-C and termination; workers are stopped by it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if encoder is None:  # spawn: build from the spec
        (type_, path, options), keys, append_eod, dtype, stop, limits = spec
        encoder = ChunkEncoder(build_tokenizer(type_, path, **options), keys, append_eod, dtype, stop, *limits)
    files: dict[str, int] = {}
    try:
        while (task := tasks.recv()) is not None:
            chunk, size = task
            try:
                if size is not None:  # a reference into an uncompressed file: read it here, not in the parent
                    if chunk.path not in files:
                        files[chunk.path] = os.open(chunk.path, os.O_RDONLY)
                    with names_file(chunk.path):
                        chunk.payload = os.pread(files[chunk.path], size, chunk.offset)
                    if len(chunk.payload) != size:
                        raise OSError(f"{chunk.path} changed while it was being read")
                results.send(encoder(chunk))
            except Exception as exc:
                results.send(_WorkerFailure(exc, traceback.format_exc()))
    finally:
        for fd in files.values():
            os.close(fd)


@dataclass
class _WorkerFailure:
    error: BaseException | None
    text: str

    def __reduce__(self):  # the exception itself when it pickles, its traceback text always
        try:
            error = pickle.loads(pickle.dumps(self.error))
        except Exception:
            error = None
        return (_WorkerFailure, (error, self.text))


def _pooled(encoder: ChunkEncoder, chunks, workers: int, spec, depth: int = 3):
    """`workers` processes run whole chunks, each given at most `depth` at a time (to whichever has fewest);
    results come back in input order. Uncompressed inputs travel as (offset, size) and workers read them.
    """
    fork = "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else "spawn")
    procs, tasks, results = [], [], []
    try:
        for _ in range(workers):
            task_reader, task_writer = ctx.Pipe(duplex=False)
            result_reader, result_writer = ctx.Pipe(duplex=False)
            _grow_pipe(result_writer)  # a worker's result fits the pipe: it need not wait for the parent
            proc = ctx.Process(
                target=_worker_main,
                args=(task_reader, result_writer, encoder if fork else None, None if fork else spec),
                daemon=True,
            )
            proc.start()
            task_reader.close()
            result_writer.close()
            procs.append(proc)
            tasks.append(task_writer)
            results.append(result_reader)
        in_flight = [0] * workers
        done: dict[int, ChunkResult] = {}
        source = iter(chunks)
        exhausted = False
        next_seq = 0
        readable: dict[str, bool] = {}  # path -> workers can read it themselves (a regular, uncompressed file)
        while True:
            while not exhausted and sum(in_flight) + len(done) < depth * workers:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                worker = in_flight.index(min(in_flight))
                if chunk.path not in readable:
                    readable[chunk.path] = not chunk.path.endswith(".gz") and os.path.isfile(chunk.path)
                reference = readable[chunk.path]
                size = len(chunk.payload) if reference else None
                payload_free = dataclasses.replace(chunk, payload=b"") if reference else chunk
                try:
                    tasks[worker].send((payload_free, size))
                except (BrokenPipeError, ConnectionResetError):
                    _died(procs[worker])
                in_flight[worker] += 1
            if not any(in_flight) and not done:
                break
            if next_seq not in done:
                ready = mp.connection.wait([*results, *(p.sentinel for p in procs)])
                for worker, (conn, proc) in enumerate(zip(results, procs, strict=True)):
                    if conn not in ready and proc.sentinel not in ready:
                        continue
                    try:
                        result = conn.recv()
                    except EOFError:  # the pipe closed: the worker is gone
                        _died(proc)
                    if isinstance(result, _WorkerFailure):
                        if result.error is not None:
                            raise result.error
                        raise RuntimeError(f"a preprocessing worker failed:\n{result.text}")
                    done[result.seq] = result
                    in_flight[worker] -= 1
            while next_seq in done:
                yield done.pop(next_seq)
                next_seq += 1
        for conn in tasks:
            conn.send(None)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for conn in [*tasks, *results]:
            conn.close()


def _died(proc) -> None:
    proc.join(5)
    raise RuntimeError(f"preprocessing worker {proc.pid} died (exit code {proc.exitcode})")


def _grow_pipe(connection, size: int = 1 << 20) -> None:
    """Raises a pipe's capacity (Linux F_SETPIPE_SZ) where allowed; a no-op elsewhere."""
    try:
        import fcntl

        fcntl.fcntl(connection.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ImportError, ValueError):
        return  # the default capacity still works: a worker then waits for the parent to read a large result


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
    vocab_file=None,
    merge_file=None,
    log_interval: int = 10000,
    chunk_bytes: int = 1 << 18,
    worker_kind: str = "auto",
    progress_stream=None,
    force: bool = False,
    max_document_bytes: int | None = MAX_DOCUMENT_BYTES,
    piece_chars: int = PIECE_CHARS,
) -> PreprocessStats:
    """Tokenizes `inputs` into one dataset per JSON key; see the module docstring. Returns the counts.

    `worker_kind` "thread" or "process" overrides the choice the module docstring describes ("auto"). Existing
    outputs are replaced only with `force`, and never when they are among the inputs. A record with more text
    than the encoder may take at once (`max_document_bytes`, 0 or None for no limit) is a bad line.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if worker_kind not in ("auto", "thread", "process"):
        raise ValueError(f"worker_kind must be 'auto', 'thread' or 'process', got {worker_kind!r}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    if max_document_bytes is not None and max_document_bytes < 0:
        raise ValueError(f"max_document_bytes must be 0 (no limit) or positive, got {max_document_bytes}")
    start = time.perf_counter()
    files = expand_inputs(inputs)
    outputs = [output_prefix(output_prefix_, key) for key in json_keys]
    refuse_overwrite([prefix + ext for prefix in outputs for ext in (".bin", ".idx")], files, force)
    # One encoding thread per worker: the parallelism is the workers' (restored on return).
    saved_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    options = {"vocab_size": vocab_size, "vocab_file": vocab_file, "merge_file": merge_file}
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, **options)
    dtype = optimal_dtype(tokenizer.vocab_size)
    stats = PreprocessStats(outputs=outputs)
    writers = [IndexedDatasetWriter(prefix, dtype) for prefix in stats.outputs]
    progress = _Progress(log_interval, progress_stream)
    limits = (max_document_bytes, piece_chars)
    encoder = ChunkEncoder(tokenizer, json_keys, append_eod, dtype, on_bad_line == "error", *limits)
    chunks = iter_chunks(files, chunk_bytes)
    if worker_kind == "auto":
        threads = workers == 1 or (tokenizer.encodes_without_gil and workers <= MAX_THREAD_WORKERS)
        worker_kind = "thread" if threads else "process"
    if worker_kind == "thread":
        results = _threaded(encoder, chunks, workers)
    else:
        stop = on_bad_line == "error"
        spec = ((tokenizer_type, tokenizer_model, options), json_keys, append_eod, dtype, stop, limits)
        results = _pooled(encoder, chunks, workers, spec)
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
        if saved_parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_parallelism
        progress.close()
    stats.seconds = time.perf_counter() - start
    return stats


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
    parser.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    parser.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    parser.add_argument("--append-eod", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="encoding threads or processes")
    parser.add_argument(
        "--worker-kind",
        choices=["auto", "thread", "process"],
        default="auto",
        help="auto: threads for GIL-free tokenizers (Hugging Face, tiktoken) up to "
        f"{MAX_THREAD_WORKERS} workers, else processes",
    )
    parser.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    parser.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--max-document-bytes",
        type=int,
        default=MAX_DOCUMENT_BYTES,
        help="most text (UTF-8 bytes) the tokenizer encodes at once, 0 for no limit; a document over it is a bad "
        "line. Tokenizers that encode long documents in parts (byte-level BPE, tiktoken, byte, null) only count "
        "stretches without a cut point (a space after a non-space, a newline after a letter or digit)",
    )
    args = parser.parse_args(argv)
    stop_on_sigterm()
    return run_command("megalith-preprocess", lambda: _run(args))


def _run(args) -> int:
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
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        log_interval=args.log_interval,
        worker_kind=args.worker_kind,
        force=args.force,
        max_document_bytes=args.max_document_bytes,
    )
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
