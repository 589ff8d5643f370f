"""Speed of Megalith's fused kernels against the plain PyTorch ops they replace in the model: a table.

    python benchmarks/kernels.py                      # CPU, float32 and bfloat16, at the default training shape
    python benchmarks/kernels.py --cuda               # the GPU too (bfloat16 and float32, a larger shape)
    python benchmarks/kernels.py --write-auto-table   # and record the winners in megalith/kernels/auto_table.json
    python benchmarks/kernels.py --threads 1 --clock cpu   # one thread, CPU time: steadier on a busy machine

Each op runs forward + backward on the layouts the model gives it: q/k/v are views of one fused qkv
projection, gate/up the two halves of the fc1 output. The
"torch" column is what `megalith.core`'s kernels="torch" computes (scaled_dot_product_attention with
enable_gqa, rotate-half RoPE with torch.cat, F.silu(gate) * up, ...). Ops and implementations are interleaved
in one loop and each time is the best of --repeats (the minimum is the least disturbed by other processes);
before each timed call a matrix product the size of a projection runs, so torch's OpenMP threads are in the
state a training step leaves them in. The default CPU shape is a small Llama (batch 4, seq 256, hidden 512,
8 heads / 4 kv heads of 64, ffn 1376, vocab 8000).

With --write-auto-table, every (device type, dtype, op) measured gets "fused" when the fused forward +
backward was at least as fast as torch's, else "torch"; entries this run did not measure are kept.
`megalith.kernels.auto_choice` reads the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from megalith.kernels import ops

AUTO_TABLE = Path(__file__).resolve().parents[1] / "python" / "megalith" / "kernels" / "auto_table.json"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One training shape: batch, seq, hidden, heads, kv heads, head dim, ffn width, vocabulary."""

    batch: int
    seq: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    def __str__(self) -> str:
        return ",".join(str(v) for v in dataclasses.astuple(self))


CPU_SHAPE = Shape(4, 256, 512, 8, 4, 64, 1376, 8000)
CUDA_SHAPE = Shape(2, 4096, 4096, 32, 8, 128, 14336, 32000)


# ---- the "torch" side: the computations of megalith.core's kernels="torch" ops ----------------------------


def _torch_rms_norm(x, weight, eps=1e-5):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _torch_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _torch_attention(q, k, v, causal=True):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=q.shape[2] != k.shape[2]
    )
    return out.transpose(1, 2)


def _torch_cross_entropy(logits, target):
    flat = logits.flatten(0, -2).float()
    return F.cross_entropy(flat, target.flatten(), reduction="none").view(target.shape)


def _torch_softmax(x, scale, causal):
    mask = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).triu(1) if causal else None
    scores = (x * scale) if mask is None else (x * scale).masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), -1).to(x.dtype)


# ---- cases: (name, leaves, fused forward, torch forward) ----------------------------------------------------


def _cases(sh: Shape, device: str, dtype: torch.dtype) -> list[tuple[str, list[torch.Tensor], Callable, Callable]]:
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    b, s, n, k, d = sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim
    angles = torch.arange(s, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    x, w, bias = r(b, s, sh.hidden), r(sh.hidden), r(sh.hidden)
    qkv, h, fc1 = r(b, s, (n + 2 * k) * d), r(b, s, 2 * sh.ffn), r(b, s, sh.ffn)
    q_rot, k_rot = r(b, s, n, d), r(b, s, k, d)  # the attention's q and k come out of RoPE contiguous
    logits = r(b, s, sh.vocab, scale=3.0)
    target = torch.randint(0, sh.vocab, (b, s), device=device)
    scores = r(b, n, s, s, scale=3.0)

    def split(t):
        q_, k_, v_ = t.split([n * d, k * d, k * d], dim=-1)
        return q_.view(b, s, n, d), k_.view(b, s, k, d), v_.view(b, s, k, d)

    def rope(fn):
        def run():
            q_, k_, _ = split(qkv)
            return torch.cat([fn(q_, cos, sin).flatten(2), fn(k_, cos, sin).flatten(2)], dim=-1)

        return run

    return [
        ("rms_norm", [x, w], lambda: ops.rms_norm(x, w, 1e-5), lambda: _torch_rms_norm(x, w)),
        ("layer_norm", [x, w, bias], lambda: ops.layer_norm(x, w, bias, 1e-5),
         lambda: F.layer_norm(x, (sh.hidden,), w, bias, 1e-5)),
        ("rope", [qkv], rope(ops.rope), rope(_torch_rope)),
        ("swiglu", [h], lambda: ops.swiglu(*h.chunk(2, -1)), lambda: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]),
        ("bias_gelu", [fc1], lambda: ops.bias_gelu(fc1, None), lambda: F.gelu(fc1, approximate="tanh")),
        ("cross_entropy", [logits], lambda: ops.cross_entropy(logits, target),
         lambda: _torch_cross_entropy(logits, target)),
        ("scaled_softmax", [scores], lambda: ops.scaled_softmax(scores, 0.125, True),
         lambda: _torch_softmax(scores, 0.125, True)),
        ("attention", [q_rot, k_rot, qkv], lambda: ops.attention(q_rot, k_rot, split(qkv)[2], True),
         lambda: _torch_attention(q_rot, k_rot, split(qkv)[2])),
    ]  # fmt: skip


# ---- timing ------------------------------------------------------------------------------------------------


class _Clock:
    """Wall-clock marks (or, with cpu_time, the CPU time of the calling thread); on CUDA, events on the current
    stream read after one synchronize."""

    def __init__(self, device: str, cpu_time: bool = False):
        self.cuda = device == "cuda"
        self.now = time.thread_time if cpu_time else time.perf_counter

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.now()

    def seconds(self, start, end) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


def _run_once(fn: Callable, leaves: list[torch.Tensor], clock: _Clock, warm: Callable) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of one call, after `warm()`."""
    warm()
    t0 = clock.mark()
    out = fn()
    t1 = clock.mark()
    out.backward(torch.ones_like(out))
    t2 = clock.mark()
    fwd, total = clock.seconds(t0, t1), clock.seconds(t0, t2)
    for t in leaves:
        t.grad = None
    return fwd, total


def median_seconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of fn() after two warm-up calls (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(2):
        fn()
    clock, samples = _Clock(device), []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        samples.append(clock.seconds(start, clock.mark()))
    return statistics.median(samples)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a 256 MiB device-to-device copy, counting bytes read plus bytes written (the ceiling of a
    memory-bound op)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_seconds(lambda: dst.copy_(src), device, repeats)


def matmul_tflops(device: str, repeats: int, n: int = 8192) -> float:
    """TFLOP/s of an n x n x n bfloat16 matmul on random data (the matrix units' practical ceiling)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats) / 1e12


def measure(
    sh: Shape, device: str, dtype: torch.dtype, repeats: int, only: set[str] | None, cpu_time: bool = False
) -> list[dict]:
    """Best-of-`repeats` forward and forward + backward times of each op, fused and torch, interleaved."""
    cases = [c for c in _cases(sh, device, dtype) if only is None or c[0] in only]
    clock = _Clock(device, cpu_time)
    a = torch.randn(sh.batch * sh.seq, sh.hidden, device=device, dtype=dtype)
    wq = torch.randn(sh.hidden, sh.hidden, device=device, dtype=dtype)

    def warm():  # a projection-sized GEMM: torch's intra-op threads are then as busy as in a training step
        a @ wq

    best = {(name, impl): (math.inf, math.inf) for name, *_ in cases for impl in ("fused", "torch")}
    for i in range(repeats + 2):  # the first two rounds warm up allocators and caches
        for name, leaves, fused, plain in cases:
            for impl, fn in (("fused", fused), ("torch", plain)):
                fwd, total = _run_once(fn, leaves, clock, warm)
                if i >= 2:
                    old = best[name, impl]
                    best[name, impl] = (min(old[0], fwd), min(old[1], total))
    rows = []
    for name, *_ in cases:
        (ff, ft), (tf, tt) = best[name, "fused"], best[name, "torch"]
        rows.append({"op": name, "fused_fwd_ms": 1e3 * ff, "fused_ms": 1e3 * ft, "torch_fwd_ms": 1e3 * tf,
                     "torch_ms": 1e3 * tt, "choice": "fused" if ft <= tt else "torch"})  # fmt: skip
    return rows


def print_table(device: str, dtype: torch.dtype, sh: Shape, rows: list[dict], repeats: int, clock: str) -> None:
    what = "CPU time of one thread" if clock == "cpu" else f"{torch.get_num_threads()} threads, wall time"
    print(f"\n{device} {str(dtype).removeprefix('torch.')}, B,S,H,N,K,D,F,V = {sh}, best of {repeats}, {what}")
    print(f"{'op':<15}{'fused fwd':>10}{'torch fwd':>10}{'fused f+b':>11}{'torch f+b':>11}{'fused/torch':>13}  auto")
    for r in rows:
        print(f"{r['op']:<15}{r['fused_fwd_ms']:>10.2f}{r['torch_fwd_ms']:>10.2f}{r['fused_ms']:>11.2f}"
              f"{r['torch_ms']:>11.2f}{r['fused_ms'] / r['torch_ms']:>12.2f}x  {r['choice']}")  # fmt: skip
    print("(milliseconds; f+b = forward + backward)")


def write_auto_table(path: Path, results: dict, run_conditions: dict) -> None:
    """Merges `results` ({device: {dtype: rows}}) into the JSON table at `path`, op by op: entries this run did
    not measure are kept, and each device's conditions are those of its latest run. Written to a temporary
    name, then renamed into place."""
    table = {"format": 1, "entries": {}, "conditions": {}}
    if path.exists():
        old = json.loads(path.read_text())
        table["entries"], table["conditions"] = old.get("entries", {}), old.get("conditions", {})
    for device, by_dtype in results.items():
        for dtype, rows in by_dtype.items():
            by_op = table["entries"].setdefault(device, {}).setdefault(dtype, {})
            for row in rows:
                by_op[row["op"]] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "op"}
        table["conditions"][device] = run_conditions[device]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(device: str, sh: Shape, repeats: int) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:  # the instruction set of the CPU kernels, where this build reports it
        isa = getattr(ops, "cpu_isa", lambda: "?")()
        name = f"{_cpu_name()}, {os.cpu_count()} cpus, kernels {isa}"
    return {"device": name, "shape": str(sh), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": repeats}  # fmt: skip


def _shape(text: str) -> Shape:
    try:
        values = [int(v) for v in text.split(",")]
        return Shape(*values)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"--shape wants 8 integers B,S,H,N,K,D,F,V, got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="also measure the CUDA kernels")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU (with --cuda)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per op (the best one is kept)")
    parser.add_argument("--shape", type=_shape, default=None, help="B,S,H,N,K,D,F,V (default: per device)")
    parser.add_argument("--ops", default=None, help="comma-separated subset of ops")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first (CPU)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="cpu: CPU time of the calling thread (needs --threads 1); steadier than wall time on a shared machine",
    )  # fmt: skip
    parser.add_argument("--write-auto-table", action="store_true", help=f"record the winners in {AUTO_TABLE}")
    parser.add_argument("--auto-table", type=Path, default=AUTO_TABLE, help="where --write-auto-table writes")
    args = parser.parse_args()
    only = None if args.ops is None else set(args.ops.split(","))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        ops.set_num_threads(args.threads)  # builds whose kernels do not follow torch's thread count
    if args.clock == "cpu" and (torch.get_num_threads() != 1 or args.cuda):
        raise SystemExit("--clock cpu counts the calling thread only: use it with --threads 1 and without --cuda")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    devices = ([] if args.no_cpu else ["cpu"]) + (["cuda"] if args.cuda else [])
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--cuda: torch sees no CUDA device")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {_cpu_name()}")
    results, run_conditions = {}, {}
    for device in devices:
        sh = args.shape or (CPU_SHAPE if device == "cpu" else CUDA_SHAPE)
        run_conditions[device] = conditions(device, sh, args.repeats) | {"clock": args.clock}
        for dtype in dtypes:
            rows = measure(sh, device, dtype, args.repeats, only, args.clock == "cpu")
            print_table(device, dtype, sh, rows, args.repeats, args.clock)
            results.setdefault(device, {})[str(dtype).removeprefix("torch.")] = rows
    if args.write_auto_table:
        write_auto_table(args.auto_table, results, run_conditions)


if __name__ == "__main__":
    main()
