"""Speed of Megalith's fused kernels against plain PyTorch: a table, not a test.

    python benchmarks/kernels.py            # CPU kernels vs torch eager (small sizes, float32 and bfloat16)
    python benchmarks/kernels.py --cuda     # also CUDA at training sizes (tokens 16k, hidden 4096; attention
                                            # B=4, S=4096, Hq=32, Hkv=8, D=128, causal) vs torch eager,
                                            # torch.compile of the reference, and SDPA for attention

Times are medians (CUDA events on the GPU, perf_counter on the CPU) of forward + backward. GB/s counts the
bytes each op must read and write once; on the GPU it is also shown as a fraction of the device-to-device
copy bandwidth measured in the same run. Attention reports TFLOP/s (causal: half of the 4*B*S^2*Hq*D forward
FLOPs, times 3.5 for forward + backward).
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
    nbytes = {
        "rms_norm": 4 * tokens * hidden * e,  # x, y forward; dy, x, dx backward (weights are negligible)
        "layer_norm": 4 * tokens * hidden * e,
        "swiglu": 7 * tokens * hidden * e,
        "bias_gelu": 5 * tokens * hidden * e,
        "rope": 4 * rope_x.numel() * e,
        "cross_entropy": 3 * rows_ce * vocab * e,
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


def _copy_bandwidth(device: str, repeats: int) -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _time(lambda: dst.copy_(src), device, repeats)


def run(device: str, dtype: torch.dtype, tokens: int, hidden: int, attn, repeats: int, compile_ref: bool) -> None:
    cases, nbytes = _cases(device, dtype, tokens, hidden, attn)
    copy_bw = _copy_bandwidth(device, repeats)
    b, s, hq, _, d = attn
    attn_flops = 4 * b * s * s * hq * d * 0.5 * 3.5
    print(f"\n{device} {str(dtype).replace('torch.', '')}: tokens {tokens}, hidden {hidden}, attention {attn}, "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (forward + backward, median of {repeats})")  # fmt: skip
    header = f"{'op':<14}{'megalith ms':>12}{'eager ms':>10}{'speedup':>9}"
    header += f"{'compiled ms':>13}" if compile_ref else ""
    header += f"{'megalith GB/s':>15}{'% of copy':>10}{'TFLOP/s':>9}"
    print(header)
    for name, op, reference, tensors, extra in cases:
        ours = _time(_fwd_bwd(op, tensors, extra), device, repeats)
        eager = _time(_fwd_bwd(reference, tensors, extra), device, repeats)
        line = f"{name:<14}{ours * 1e3:>12.3f}{eager * 1e3:>10.3f}{eager / ours:>8.2f}x"
        if compile_ref:
            compiled = _time(_fwd_bwd(torch.compile(reference), tensors, extra), device, repeats)
            line += f"{compiled * 1e3:>13.3f}"
        if name == "attention":
            line += f"{'':>15}{'':>10}{attn_flops / ours / 1e12:>9.3f}"
        else:
            gbs = nbytes[name] / ours
            line += f"{gbs / 1e9:>15.1f}{100 * gbs / copy_bw:>9.0f}%"
        print(line)
        if name == "attention" and device == "cuda":
            sdpa = _time(_fwd_bwd(_sdpa, tensors, extra), device, repeats)
            print(f"{'  sdpa':<14}{sdpa * 1e3:>12.3f}{'':>10}{sdpa / ours:>8.2f}x (megalith vs SDPA)"
                  f"{'':>13}{'':>15}{'':>10}{attn_flops / sdpa / 1e12:>9.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="also benchmark the CUDA kernels at training sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for dtype in (torch.float32, torch.bfloat16):
        run("cpu", dtype, 2048, 1024, (1, 512, 8, 2, 64), args.repeats, compile_ref=False)
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: torch sees no CUDA device")
        for dtype in (torch.bfloat16,):
            run("cuda", dtype, 16384, 4096, (4, 4096, 32, 8, 128), max(args.repeats, 10), compile_ref=True)


if __name__ == "__main__":
    main()
