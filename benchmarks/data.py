"""Data pipeline benchmark: sample-index build (C++ vs pure Python) and preprocessing throughput.

    python benchmarks/data.py            # full sizes (10^10 tokens; trains a 32k BPE on the stdlib corpus)
    python benchmarks/data.py --quick    # small sizes, for a smoke run
    python benchmarks/data.py --only long-document --document-mb 50   # peak memory of one huge jsonl document
    python benchmarks/data.py --only open-index   # time to open (and validate) large .idx files

Every number is measured in the same run as its baseline; each measurement runs in a fresh process so peak RSS
and start-up are its own. Prints tables; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.data.reference_indexing, the pure-Python builder


def _inputs(num_docs: int, tokens: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    mean = tokens // num_docs
    sizes = rng.integers(1, 2 * mean, size=num_docs, dtype=np.int32)
    document_index = rng.permutation(num_docs).astype(np.int32)
    return sizes, document_index, int(sizes.sum(dtype=np.int64))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Resets the kernel's peak-RSS mark (Linux) and returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kb("VmRSS") * 1024


def _index_child(kind: str, inputs: str, seq: int, queue) -> None:
    import numpy as np

    # Inputs were generated in the parent and are loaded whole here, so the peak RSS before the build is the
    # interpreter plus the inputs, and the growth during the build is what the builder allocates.
    sizes = np.load(f"{inputs}-sizes.npy")
    document_index = np.load(f"{inputs}-document_index.npy")
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    if kind == "C++":
        from megalith.data import build_sample_index
    else:
        from tests.data.reference_indexing import reference_sample_index
    before = _reset_peak_rss()
    start = time.perf_counter()
    if kind == "C++":
        out = build_sample_index(sizes, document_index, seq, 1, tokens_per_epoch)
    else:
        out = reference_sample_index(sizes, document_index, seq, 1, tokens_per_epoch, True, True)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") * 1024 - before
    queue.put((seconds, peak, out.nbytes, out.shape[0] - 1))


def _run_child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_index(quick: bool) -> None:
    seq = 4096
    scales = [(10**5, 10**8), (10**6, 10**9)] if quick else [(10**6, 10**9), (10**7, 10**10)]
    print(f"\n## Sample index build (seq_length {seq}, one epoch; fresh process each; peak RSS above inputs)\n")
    print("| documents | tokens | builder | samples | seconds | peak extra RSS (MB) | output (MB) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    import numpy as np

    for num_docs, tokens in scales:
        with tempfile.TemporaryDirectory() as work:
            inputs = f"{work}/inputs"
            sizes, document_index, _ = _inputs(num_docs, tokens)
            np.save(f"{inputs}-sizes.npy", sizes)
            np.save(f"{inputs}-document_index.npy", document_index)
            del sizes, document_index
            cpp = _run_child(_index_child, "C++", inputs, seq)
            ref = _run_child(_index_child, "Python", inputs, seq)
        for name, (seconds, peak, nbytes, samples) in (("pure Python (baseline)", ref), ("C++", cpp)):
            speed = f"{ref[0] / seconds:.0f}x" if name == "C++" else "1x"
            print(
                f"| {num_docs:.0e} | {tokens:.0e} | {name} | {samples:,} | {seconds:.3f} | {peak / 1e6:.1f} | "
                f"{nbytes / 1e6:.1f} | {speed} |"
            )


def _encode_child(tokenizer_dir: str, corpus: str, mode: str, threads: int, queue) -> None:
    os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    with open(corpus, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if mode == "encode":
        for text in texts:
            tok.encode(text, add_special_tokens=False)
    else:
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        for i in range(0, len(texts), 256):
            batch(texts[i : i + 256], add_special_tokens=False)
    queue.put((time.perf_counter() - start, _cpu_seconds(resource.RUSAGE_SELF) - cpu))


def _cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _command(args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all its threads and processes) of one run of a command."""
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def bench_preprocess(quick: bool, work: Path, repeat: int) -> None:
    from megalith.data.corpus import write_stdlib_corpus
    from megalith.data.tokenizer_cli import train_bpe

    corpus = work / "stdlib.jsonl"
    info = write_stdlib_corpus(corpus, max_documents=300 if quick else None)
    size = corpus.stat().st_size
    vocab = 4096 if quick else 32768
    start = time.perf_counter()
    with open(corpus, encoding="utf-8") as handle:
        tokenizer_dir = train_bpe((json.loads(line)["text"] for line in handle), vocab, work / "tokenizer")
    train_seconds = time.perf_counter() - start
    print(
        f"\n## Preprocessing the stdlib corpus ({info['documents']:,} documents, {size / 1e6:.1f} MB jsonl) with a "
        f"{vocab:,}-token byte-level BPE (trained in {train_seconds:.1f} s)\n"
    )

    def preprocess_command(workers):
        return [sys.executable, "-m", "megalith.data.preprocess", "--input", str(corpus), "--output-prefix",
                str(work / f"w{workers}"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                str(tokenizer_dir), "--append-eod", "--workers", str(workers), "--force"]  # fmt: skip

    # Every configuration runs `repeat` times, interleaved, and keeps its best time, so load from other
    # processes on the machine hits all of them alike.
    configs = [("encode", 1), ("encode_batch", 1), ("encode_batch", 2), ("command", 1), ("command", 2)]
    # The CPU seconds (all threads, user + sys) of the best run show how much work each configuration does beyond
    # the encoding, and whether it had the cores to itself.
    best = dict.fromkeys(configs, (float("inf"), 0.0))
    for _ in range(repeat):
        for mode, threads in configs:
            if mode == "command":
                seconds, cpu = _command(preprocess_command(threads))
            else:
                seconds, cpu = _run_child(_encode_child, str(tokenizer_dir), str(corpus), mode, threads)
            best[mode, threads] = min(best[mode, threads], (seconds, cpu))
    rate = {config: size / seconds / 1e6 for config, (seconds, _) in best.items()}
    print(
        f"| what | threads / workers | seconds (best of {repeat}) | CPU seconds | input MB/s | "
        "vs encode_batch, same threads |"
    )
    print("|---|---|---|---|---|---|")
    labels = {
        "encode": "tokenizers alone: loop of encode()",
        "encode_batch": "tokenizers alone: encode_batch",
        "command": "megalith-preprocess (whole command)",
    }
    for mode, threads in configs:
        ratio = f"{rate[mode, threads] / rate['encode_batch', threads]:.0%}" if mode == "command" else ""
        seconds, cpu = best[mode, threads]
        print(f"| {labels[mode]} | {threads} | {seconds:.2f} | {cpu:.2f} | {rate[mode, threads]:.2f} | {ratio} |")
    command_rate = {1: rate["command", 1], 2: rate["command", 2]}
    one = work / "one.jsonl"
    one.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    startup = min(
        _command(
            [
                sys.executable,
                "-m",
                "megalith.data.preprocess",
                "--input",
                str(one),
                "--output-prefix",
                str(work / "one"),
                "--tokenizer-type",
                "HuggingFaceTokenizer",
                "--tokenizer-model",
                str(tokenizer_dir),
                "--force",
            ]
        )[0]
        for _ in range(3)
    )
    library = rate["encode_batch", 2] / rate["encode_batch", 1]
    print(
        f"\n2 workers vs 1 worker: {command_rate[2] / command_rate[1]:.2f}x (the tokenizer library alone, "
        f"encode_batch on 2 threads vs 1: {library:.2f}x); start-up (whole command on a one-document input, "
        f"best of 3): {startup:.2f} s; machine: {os.cpu_count()} CPUs"
    )


# Runs a command and prints its peak RSS in KiB. A process's peak RSS includes that of the process image it
# replaced (exec keeps the larger mark), so the command is started from this small interpreter rather than from
# the benchmark, whose own peak (tokenizer training) would otherwise be counted.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
print(proc.returncode, usage.ru_maxrss)
"""


def _peak_rss_of(args) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one run of a command, from the kernel's accounting of that child."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    code, max_rss_kib = (int(v) for v in out.stdout.split())
    if code != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed (exit code {code}): {out.stderr[-2000:]}")
    return seconds, max_rss_kib * 1024


def bench_long_document(quick: bool, work: Path, document_mb: float) -> None:
    """Peak RSS of megalith-preprocess on a jsonl holding one document of `document_mb` MB, against a small input.

    The document is the stdlib sources concatenated (repeated as needed); the tokenizer is a byte-level BPE
    trained on the first few MB of them.
    """
    from megalith.data.corpus import stdlib_files
    from megalith.data.tokenizer_cli import train_bpe

    target = int(document_mb * 1e6)
    texts, size = [], 0
    for path in stdlib_files():
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    sample = texts[:300]
    vocab = 4096 if quick else 32768
    tokenizer_dir = train_bpe(sample, vocab, work / "tokenizer")
    parts = []
    while size < target:
        for text in texts:
            parts.append(text)
            size += len(text.encode("utf-8"))
            if size >= target:
                break
    document = work / "one-document.jsonl"
    document.write_text(json.dumps({"text": "".join(parts)}, ensure_ascii=False) + "\n", encoding="utf-8")
    small = work / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample[:10]), encoding="utf-8")
    del parts, texts, sample

    def command(source, name):
        return [sys.executable, "-m", "megalith.data.preprocess", "--input", str(source), "--output-prefix",
                str(work / name), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                str(tokenizer_dir), "--append-eod"]  # fmt: skip

    print(f"\n## Peak memory of megalith-preprocess on one long document ({vocab:,}-token byte-level BPE)\n")
    print("| input | input MB | seconds | peak RSS (MB) | peak RSS above the small input (MB) | extra / input |")
    print("|---|---|---|---|---|---|")
    base_seconds, base_rss = _peak_rss_of(command(small, "small"))
    seconds, rss = _peak_rss_of(command(document, "long"))
    small_mb = small.stat().st_size / 1e6
    print(f"| 10 short documents (baseline) | {small_mb:.2f} | {base_seconds:.2f} | {base_rss / 1e6:.0f} | | |")
    extra = rss - base_rss
    print(
        f"| one document | {document.stat().st_size / 1e6:.1f} | {seconds:.2f} | {rss / 1e6:.0f} | "
        f"{extra / 1e6:.0f} | {extra / document.stat().st_size:.1f}x |"
    )


def _write_large_index(prefix: str, num_sequences: int) -> None:
    """A uint16 dataset of `num_sequences` one-sequence documents of 1 to 16 tokens; the `.bin` is sparse."""
    import numpy as np

    from megalith.data.indexed import _HEADER, MAGIC, VERSION, dtype_code

    lengths = np.random.default_rng(0).integers(1, 17, size=num_sequences, dtype=np.int32)
    pointers = np.zeros(num_sequences, np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
    with open(prefix + ".idx", "wb") as handle:
        handle.write(_HEADER.pack(MAGIC, VERSION, dtype_code(np.uint16), num_sequences, num_sequences + 1))
        handle.write(lengths.tobytes())
        handle.write(pointers.tobytes())
        del pointers
        handle.write(np.arange(num_sequences + 1, dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as handle:
        handle.truncate(int(lengths.sum(dtype=np.int64)) * 2)


def bench_open_index(quick: bool, work: Path, repeat: int = 5) -> None:
    """Seconds to open an IndexedDataset (header, sizes and the validation of its arrays), page cache warm."""
    from megalith.data import IndexedDataset

    scales = [10**5, 10**6] if quick else [10**6, 10**7, 10**8]
    print(f"\n## Opening an indexed dataset (best of {repeat}, files in the page cache)\n")
    print("| sequences | .idx MB | milliseconds to open | milliseconds for content_key (cache key) |")
    print("|---|---|---|---|")
    for num_sequences in scales:
        prefix = str(work / f"open{num_sequences}")
        _write_large_index(prefix, num_sequences)
        IndexedDataset(prefix)  # reads the files into the page cache
        best = best_key = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            dataset = IndexedDataset(prefix)
            best = min(best, time.perf_counter() - start)
            start = time.perf_counter()
            _ = getattr(dataset, "content_key", None)
            best_key = min(best_key, time.perf_counter() - start)
            del dataset
        size = os.path.getsize(prefix + ".idx")
        print(f"| {num_sequences:.0e} | {size / 1e6:.0f} | {best * 1e3:.3f} | {best_key * 1e3:.1f} |")
        for ext in (".bin", ".idx"):
            os.remove(prefix + ext)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", choices=["index", "preprocess", "long-document", "open-index"], default=None)
    parser.add_argument("--repeat", type=int, default=3, help="preprocessing runs per configuration (best kept)")
    parser.add_argument("--document-mb", type=float, default=50.0, help="size of the long-document benchmark")
    args = parser.parse_args()
    if args.only in (None, "index"):
        bench_index(args.quick)
    if args.only in (None, "preprocess"):
        with tempfile.TemporaryDirectory() as work:
            bench_preprocess(args.quick, Path(work), args.repeat)
    if args.only == "long-document":  # not in the default set: it needs several GB of memory before the fix
        with tempfile.TemporaryDirectory() as work:
            bench_long_document(args.quick, Path(work), args.document_mb)
    if args.only in (None, "open-index"):
        with tempfile.TemporaryDirectory() as work:
            bench_open_index(args.quick, Path(work))


if __name__ == "__main__":
    main()
