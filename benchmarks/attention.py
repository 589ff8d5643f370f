"""Speed of Megalith's attention (dense and varlen) against named baselines: a table, not a test.

    python benchmarks/attention.py            # CPU: packed (varlen) vs dense attention at small sizes
    python benchmarks/attention.py --cuda     # also the GPU at llama3-8b training shapes (Hq=32, Hkv=8, D=128,
                                              # bf16, causal, B=1..4, S=4096/8192) against torch SDPA's flash,
                                              # cuDNN and memory-efficient backends, plus varlen vs dense

Times are medians (CUDA events on the GPU, perf_counter on the CPU) of the forward pass and of forward +
backward. TFLOP/s count the useful matmul work the usual way: 4 * S_q * S_k * Hq * D per sequence for the
forward (halved when causal), 2.5 times that for the backward, so forward + backward is 3.5 times the forward
(Megalith's backward recomputes S and dP in both of its kernels, which this count does not credit). "ratio" is
the baseline's time over this row's (above 1: faster than the baseline named in the section header).
`llama_shapes()` returns the GPU rows (benchmarks/gpu_report.py reuses it).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from kernels import median_seconds  # benchmarks/kernels.py: python puts this folder on sys.path

from megalith.kernels import ops


def _flops(lengths: list[int], heads_q: int, dim: int, causal: bool) -> float:
    """Forward FLOPs of attention over sequences of the given lengths (each attending to itself)."""
    return sum(4 * n * n * heads_q * dim * (0.5 if causal else 1.0) for n in lengths)


def _measure(fn: Callable, tensors: list[torch.Tensor], device: str, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of fn(*tensors), whose first output is differentiated."""
    leaves = [t.detach().requires_grad_() for t in tensors]

    def forward():
        with torch.no_grad():
            fn(*leaves)

    def forward_backward():
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None

    return median_seconds(forward, device, repeats), median_seconds(forward_backward, device, repeats)


def _print_header(title: str) -> None:
    print(f"\n{title}")
    print(f"{'case':<44}{'fwd ms':>10}{'TFLOP/s':>9}{'ratio':>8}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'ratio':>8}")


def _print_row(name: str, times: tuple[float, float], flops: float, baseline: tuple[float, float] | None) -> None:
    fwd, both = times
    ratio = (baseline[0] / fwd, baseline[1] / both) if baseline else (1.0, 1.0)
    print(
        f"{name:<44}{fwd * 1e3:>10.2f}{flops / fwd / 1e12:>9.3f}{ratio[0]:>7.2f}x"
        f"{both * 1e3:>12.2f}{3.5 * flops / both / 1e12:>9.3f}{ratio[1]:>7.2f}x"
    )


def _packed_inputs(lengths, heads_q, heads_kv, dim, device, dtype):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(total, heads_q, dim, device=device, dtype=dtype)
    k, v = (torch.randn(total, heads_kv, dim, device=device, dtype=dtype) for _ in range(2))
    return q, k, v, cu


def varlen_vs_dense(device: str, dtype: torch.dtype, total: int, doc_lens: list[int], heads, dim, repeats) -> None:
    """The same tokens as one dense sequence, as a dense batch of equal documents, and packed per document."""
    heads_q, heads_kv = heads
    _print_header(
        f"{device} {str(dtype).replace('torch.', '')}: {total} tokens, Hq={heads_q}, Hkv={heads_kv}, D={dim}, causal "
        f"(baseline: one dense sequence of {total})"
    )
    q, k, v, _ = _packed_inputs([total], heads_q, heads_kv, dim, device, dtype)
    dense = _measure(lambda q, k, v: ops.attention(q, k, v, True), [q[None], k[None], v[None]], device, repeats)
    _print_row(f"dense [1, {total}]", dense, _flops([total], heads_q, dim, True), None)
    for lengths in doc_lens:
        n = len(lengths)
        q, k, v, cu = _packed_inputs(lengths, heads_q, heads_kv, dim, device, dtype)
        flops = _flops(lengths, heads_q, dim, True)
        if len(set(lengths)) == 1:
            shape = (n, lengths[0])
            batch = [t.view(*shape, *t.shape[1:]) for t in (q, k, v)]
            times = _measure(lambda q, k, v: ops.attention(q, k, v, True), batch, device, repeats)
            _print_row(f"dense batch [{n}, {lengths[0]}]", times, flops, dense)
        max_len = max(lengths)

        def packed(q, k, v, cu=cu, max_len=max_len):
            return ops.attention_with_lse(q, k, v, True, cu_seqlens_q=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)

        label = f"varlen {n} docs" + (f" of {lengths[0]}" if len(set(lengths)) == 1 else f", {min(lengths)}-{max_len}")
        _print_row(label, _measure(packed, [q, k, v], device, repeats), flops, dense)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            try:
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
                )
            except RuntimeError:  # a backend without GQA: give it expanded k/v (the expansion is timed too)
                group = q.shape[2] // k.shape[2]
                k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
                )
        return out.transpose(1, 2)

    return run


def llama_shapes(repeats: int, batches=(1, 2, 4), seqs=(4096, 8192)) -> list[dict]:
    """Megalith vs torch SDPA backends at llama3-8b attention shapes (bf16, causal): one row per shape and impl.

    Each row: batch, seq, impl, fwd_ms, fwd_tflops, fwd_bwd_ms, fwd_bwd_tflops and the ratios against SDPA's
    flash backend (the first available one), or "error" for a backend that refused the shape.
    """
    from torch.nn.attention import SDPBackend

    heads_q, heads_kv, dim = 32, 8, 128
    backends = [
        ("sdpa flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]
    rows = []
    for batch in batches:
        for seq in seqs:
            q = torch.randn(batch, seq, heads_q, dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, seq, heads_kv, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            flops = _flops([seq] * batch, heads_q, dim, True)
            impls = [(name, _sdpa(backend)) for name, backend in backends]
            impls.append(("megalith attention", lambda q, k, v: ops.attention(q, k, v, True)))
            baseline = None
            for name, fn in impls:
                row = {"batch": batch, "seq": seq, "impl": name}
                try:
                    fwd, both = _measure(fn, [q, k, v], "cuda", repeats)
                except RuntimeError as exc:
                    rows.append({**row, "error": str(exc).splitlines()[0][:120]})
                    continue
                baseline = baseline or (fwd, both)
                rows.append({**row, "fwd_ms": fwd * 1e3, "fwd_tflops": flops / fwd / 1e12, "fwd_bwd_ms": both * 1e3,
                             "fwd_bwd_tflops": 3.5 * flops / both / 1e12, "ratio_fwd": baseline[0] / fwd,
                             "ratio_fwd_bwd": baseline[1] / both})  # fmt: skip
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def print_llama_shapes(rows: list[dict]) -> None:
    """The rows of `llama_shapes`, one section per shape."""
    shape = None
    for r in rows:
        if (r["batch"], r["seq"]) != shape:
            shape = (r["batch"], r["seq"])
            _print_header(f"cuda bf16 llama3-8b: B={r['batch']}, S={r['seq']}, Hq=32, Hkv=8, D=128, causal "
                          "(baseline: sdpa flash)")  # fmt: skip
        if "error" in r:
            print(f"{r['impl']:<44}unavailable: {r['error'][:60]}")
            continue
        print(
            f"{r['impl']:<44}{r['fwd_ms']:>10.2f}{r['fwd_tflops']:>9.3f}{r['ratio_fwd']:>7.2f}x"
            f"{r['fwd_bwd_ms']:>12.2f}{r['fwd_bwd_tflops']:>9.3f}{r['ratio_fwd_bwd']:>7.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="also benchmark on the GPU at llama3-8b shapes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for dtype in (torch.float32, torch.bfloat16):
        varlen_vs_dense("cpu", dtype, 2048, [[512] * 4, [128] * 16, [1, 100, 300, 600, 1047]], (8, 2), 64, args.repeats)
    if args.cuda:
        if not torch.cuda.is_available():
            print("\n--cuda: torch sees no CUDA device; GPU entries skipped")
            return
        repeats = max(args.repeats, 10)
        print_llama_shapes(llama_shapes(repeats))
        varlen_vs_dense("cuda", torch.bfloat16, 8192, [[1024] * 8, [512] * 16, [37, 900, 2048, 4000, 1207]], (32, 8),
                        128, repeats)  # fmt: skip


if __name__ == "__main__":
    main()
