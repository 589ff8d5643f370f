"""Speed of Megalith's fused kernels against plain PyTorch: a table, not a test.

    python benchmarks/kernels.py            # CPU kernels vs torch eager (small sizes, float32 and bfloat16)
    python benchmarks/kernels.py --cuda     # also CUDA at training sizes (tokens 16k, hidden 4096; attention
                                            # B=4, S=4096, Hq=32, Hkv=8, D=128, causal) vs torch eager,
                                            # torch.compile of the reference, and SDPA for attention

Times are medians (CUDA events on the GPU, perf_counter on the CPU) of the forward alone (no autograd) and of
forward + backward; the backward is their difference. GB/s counts the bytes each pass must read and write once,
also shown as a fraction of the device-to-device copy bandwidth measured in the same run. Attention reports
TFLOP/s (causal: half of the 4*B*S^2*Hq*D forward FLOPs, times 3.5 for forward + backward). `measure()` returns
the rows (benchmarks/gpu_report.py reuses it); `print_table()` prints them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megalith.kernels import ops
from megalith.kernels import reference as ref


def _time(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of fn() after two warm-up calls."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _fwd_bwd(fn: Callable, tensors: list[torch.Tensor], extra: tuple) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]

    def run():
        out = fn(*leaves, *extra)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    return run


def _fwd(fn: Callable, tensors: list[torch.Tensor], extra: tuple) -> Callable[[], None]:
    """The forward alone, without autograd (what inference, or the forward half of a training step, costs)."""

    def run():
        with torch.no_grad():
            fn(*tensors, *extra)

    return run


def _cases(device: str, dtype: torch.dtype, tokens: int, hidden: int, attn: tuple[int, int, int, int, int]):
    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    vocab = 32768 if device == "cuda" else 8192
    rows_ce = tokens if device == "cuda" else tokens // 4
    b, s, hq, hkv, d = attn
    positions = torch.arange(s, device=device, dtype=torch.float32)[:, None]
    angles = positions * 10000.0 ** (-torch.arange(0, d, 2, device=device) / d)
    target = torch.randint(0, vocab, (rows_ce,), device=device)
    rope_x = r(b, s, hq, d)
    e = torch.finfo(dtype).bits // 8
    th = tokens * hidden * e
    # (forward, backward) bytes each op must read and write once; weights and per-row statistics are negligible.
    nbytes = {
        "rms_norm": (2 * th, 3 * th),  # x -> y; dy, x -> dx
        "layer_norm": (2 * th, 3 * th),
        "swiglu": (3 * th, 5 * th),  # gate, up -> out; dout, gate, up -> dgate, dup
        "bias_gelu": (2 * th, 3 * th),  # x -> y; dy, x -> dx
        "rope": (2 * rope_x.numel() * e, 2 * rope_x.numel() * e),  # x -> y; dy -> dx
        "cross_entropy": (rows_ce * vocab * e, 2 * rows_ce * vocab * e),  # logits -> loss; logits -> dlogits
    }
    cases = [
        ("rms_norm", ops.rms_norm, ref.rms_norm, [r(tokens, hidden), r(hidden)], ()),
        ("layer_norm", ops.layer_norm, ref.layer_norm, [r(tokens, hidden), r(hidden), r(hidden)], ()),
        ("swiglu", ops.swiglu, ref.swiglu, [r(tokens, hidden), r(tokens, hidden)], ()),
        ("bias_gelu", ops.bias_gelu, ref.bias_gelu, [r(tokens, hidden), r(hidden)], ()),
        ("rope", lambda x, c, sn: ops.rope(x, c, sn), ref.rope, [rope_x, angles.cos(), angles.sin()], ()),
        ("cross_entropy", ops.cross_entropy, ref.cross_entropy, [r(rows_ce, vocab), target], ()),
        ("attention", ops.attention, ref.attention, [r(b, s, hq, d), r(b, s, hkv, d), r(b, s, hkv, d)], (True,)),
    ]
    return cases, nbytes


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a 256 MiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _time(lambda: dst.copy_(src), device, repeats)


def matmul_tflops(device: str, repeats: int, n: int = 8192) -> float:
    """TFLOP/s of an n x n x n bfloat16 matmul on random data (the matrix units' practical ceiling)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / _time(lambda: a @ b, device, repeats) / 1e12


def _timings(fn: Callable, tensors: list[torch.Tensor], extra: tuple, device: str, repeats: int) -> dict[str, float]:
    """Milliseconds of the forward (no autograd), of forward + backward, and their difference (the backward)."""
    fwd = _time(_fwd(fn, tensors, extra), device, repeats) * 1e3
    both = _time(_fwd_bwd(fn, tensors, extra), device, repeats) * 1e3
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, "bwd_ms": max(both - fwd, 0.0)}


def measure(device: str, dtype: torch.dtype, tokens: int, hidden: int, attn, repeats: int, compile_ref: bool) -> dict:
    """Every op's Megalith and torch-eager times (and torch.compile of the reference when asked; SDPA for attention
    on CUDA), with GB/s as a fraction of the copy bandwidth (memory-bound ops) or TFLOP/s (attention).

    Returns {"device", "dtype", "tokens", "hidden", "attention", "copy_gbs", "rows": [...]}: one row per op and
    implementation, keyed "op", "impl", fwd_ms, bwd_ms, fwd_bwd_ms, "speedup" (eager fwd+bwd time over this
    row's), and fwd/bwd GB/s and % of copy or fwd/fwd_bwd TFLOP/s.
    """
    cases, nbytes = _cases(device, dtype, tokens, hidden, attn)
    copy_bw = copy_bandwidth(device, repeats)
    b, s, hq, _, d = attn
    attn_fwd_flops = 4 * b * s * s * hq * d * 0.5
    rows = []
    for name, op, reference, tensors, extra in cases:
        impls = [("megalith", op), ("eager", reference)]
        if compile_ref:
            impls.append(("compiled", torch.compile(reference)))
        if name == "attention" and device == "cuda":
            impls.append(("sdpa", _sdpa))
        times = {impl: _timings(fn, tensors, extra, device, repeats) for impl, fn in impls}
        for impl, t in times.items():
            row = {"op": name, "impl": impl, **t, "speedup": times["eager"]["fwd_bwd_ms"] / t["fwd_bwd_ms"]}
            if name == "attention":
                row["fwd_tflops"] = attn_fwd_flops / t["fwd_ms"] / 1e9
                row["fwd_bwd_tflops"] = 3.5 * attn_fwd_flops / t["fwd_bwd_ms"] / 1e9
            else:
                fwd_bytes, bwd_bytes = nbytes[name]
                row["fwd_gbs"] = fwd_bytes / t["fwd_ms"] / 1e6
                row["bwd_gbs"] = bwd_bytes / t["bwd_ms"] / 1e6 if t["bwd_ms"] > 0 else float("nan")
                row["fwd_pct_copy"] = 100 * row["fwd_gbs"] * 1e9 / copy_bw
                row["bwd_pct_copy"] = 100 * row["bwd_gbs"] * 1e9 / copy_bw
            rows.append(row)
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "hidden": hidden,
            "attention": list(attn), "copy_gbs": copy_bw / 1e9, "rows": rows}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"\n{result['device']} {result['dtype']}: tokens {result['tokens']}, hidden {result['hidden']}, attention "
          f"{tuple(result['attention'])}, copy bandwidth {result['copy_gbs']:.1f} GB/s (medians)")  # fmt: skip
    print(f"{'op':<14}{'impl':<10}{'fwd ms':>9}{'bwd ms':>9}{'vs eager':>9}{'fwd GB/s':>10}{'%copy':>7}"
          f"{'bwd GB/s':>10}{'%copy':>7}{'fwd TF/s':>10}{'f+b TF/s':>10}")  # fmt: skip
    for r in result["rows"]:
        line = f"{r['op']:<14}{r['impl']:<10}{r['fwd_ms']:>9.3f}{r['bwd_ms']:>9.3f}{r['speedup']:>8.2f}x"
        if "fwd_tflops" in r:
            line += f"{'':>34}{r['fwd_tflops']:>10.3g}{r['fwd_bwd_tflops']:>10.3g}"
        else:
            line += f"{r['fwd_gbs']:>10.1f}{r['fwd_pct_copy']:>6.0f}%{r['bwd_gbs']:>10.1f}{r['bwd_pct_copy']:>6.0f}%"
        print(line)


CUDA_SHAPES = {"tokens": 16384, "hidden": 4096, "attn": (4, 4096, 32, 8, 128)}  # llama3-8b: hidden 4096, GQA 32/8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="also benchmark the CUDA kernels at training sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for dtype in (torch.float32, torch.bfloat16):
        print_table(measure("cpu", dtype, 2048, 1024, (1, 512, 8, 2, 64), args.repeats, compile_ref=False))
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: torch sees no CUDA device")
        shapes = CUDA_SHAPES
        print_table(measure("cuda", torch.bfloat16, shapes["tokens"], shapes["hidden"], shapes["attn"],
                            max(args.repeats, 10), compile_ref=True))  # fmt: skip


if __name__ == "__main__":
    main()
