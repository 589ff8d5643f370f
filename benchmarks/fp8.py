"""Cost and speed of Megalith's native fp8 recipes against bf16: a table, not a test.

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 OMP_NUM_THREADS=1 \
    python benchmarks/fp8.py            # CPU: what each recipe adds to one linear layer (casts + scale
                                        # bookkeeping) against that layer's bf16 forward + backward
    python benchmarks/fp8.py --cuda     # also the GPU: torch._scaled_mm TFLOP/s against the bf16 GEMM at
                                        # llama3-8b linear shapes, and llama3-1b training tokens/s, fp8 vs bf16

CPU rows: "casts ms" is the time of every fp8 cast one training step of the layer makes (x and w forward, the
output gradient backward; rowwise casts x, w and g again along their other axis), with the statistics off,
plus the delayed-scaling step; "bf16 ms" is `F.linear` forward + backward in bf16 on the same shapes, the
baseline; "ratio" is casts / bf16. The last two columns time the whole fp8 layer (forward + backward), once on
the emulation (fp32 matmuls of the fp8 operands) and once on torch._scaled_mm where the CPU has it: neither is
meant to be fast on a CPU, they show what the emulation costs. Times are medians (perf_counter on the CPU, CUDA
events on the GPU). The glibc settings above keep large temporaries in the heap: by default every 4 MiB
temporary is mapped and unmapped again, and the page faults make the CPU rows vary by 2-3x from run to run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megalith.core.fp8 import ChunkScaling, Fp8Config, Fp8Training
from megalith.core.fp8.gemm import padded_scaled_mm, scaled_mm_unsupported
from megalith.core.fp8.linear import GRAD, INPUT, WEIGHT, LinearCasts, fp8_linear

RECIPES = ("tensorwise", "delayed", "rowwise")


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


def _casts(recipe: str, matmul: str = "emulated", device: str = "cpu") -> tuple[LinearCasts, Fp8Training]:
    config = Fp8Config(recipe=recipe, matmul=matmul)
    state = ChunkScaling(config, ["layer"], device)
    manager = Fp8Training([], None, config)
    manager.states = [state]
    return LinearCasts("layer", state, 0, group=None, k_sharded=False, n_sharded=False), manager


def _linear_step(x, w, g, matmul: Callable) -> Callable[[], None]:
    def run():
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        matmul(xr, wr).backward(g)

    return run


def _cast_all(x, w, g, recipe: str) -> Callable[[], None]:
    """Every cast one training step of the layer makes (statistics off), then the scale update."""
    casts, manager = _casts(recipe)

    def run():
        casts.cast(x, INPUT, (False, False), record=True)
        casts.cast(w, WEIGHT, (False, False), record=True)
        casts.cast(g, GRAD, (False, False), record=True)
        if recipe == "rowwise":  # the backward's casts along the other axis
            casts.cast(w.t(), WEIGHT, (False, False), record=False)
            casts.cast(g.t(), GRAD, (False, False), record=False)
            casts.cast(x.t(), INPUT, (False, False), record=False)
        manager.step()

    return run


def cpu_table(m: int, k: int, n: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
    g = (torch.randn(m, n, generator=gen) * 1e-3).bfloat16()
    has_scaled_mm = scaled_mm_unsupported(torch.device("cpu"), torch.float8_e4m3fn, torch.float8_e4m3fn, False,
                                          torch.bfloat16) is None  # fmt: skip
    runs: dict[str, Callable[[], None]] = {"bf16": _linear_step(x, w, g, F.linear)}
    for recipe in RECIPES:
        runs[f"{recipe} casts"] = _cast_all(x, w, g, recipe)
        for matmul in ("emulated", "scaled_mm") if has_scaled_mm else ("emulated",):
            casts, _ = _casts(recipe, matmul)
            runs[f"{recipe} {matmul}"] = _linear_step(
                x, w, g, lambda a, b, c=casts: fp8_linear(a, b, None, c, training=True)
            )
    for run in runs.values():  # warm the allocator for every row first: the first timed row would pay for it
        for _ in range(3):
            run()
    ms = {name: _time(run, "cpu", repeats) * 1e3 for name, run in runs.items()}
    bf16 = ms["bf16"]
    print(f"\nCPU, one linear layer: x [{m}, {k}], w [{n}, {k}], bf16 (threads: {torch.get_num_threads()})")
    print(f"{'recipe':<12}{'casts ms':>10}{'bf16 ms':>10}{'ratio':>8}{'fp8 emulated ms':>17}{'fp8 _scaled_mm ms':>19}")
    print(f"{'bf16':<12}{'-':>10}{bf16:>10.2f}{'-':>8}{'-':>17}{'-':>19}")
    for recipe in RECIPES:
        cast = ms[f"{recipe} casts"]
        scaled = f"{ms[f'{recipe} scaled_mm']:.2f}" if has_scaled_mm else "n/a"
        print(
            f"{recipe:<12}{cast:>10.2f}{bf16:>10.2f}{cast / bf16:>7.2f}x{ms[f'{recipe} emulated']:>17.2f}{scaled:>19}"
        )


LLAMA3_8B_LINEARS = {"qkv": (4096, 6144), "attn out": (4096, 4096), "gate-up": (4096, 28672), "down": (14336, 4096)}


def gemm_table(tokens: int, repeats: int) -> None:
    print(f"\nGPU ({torch.cuda.get_device_name()}), llama3-8b linear shapes, {tokens} tokens: forward GEMM")
    print(f"{'linear':<10}{'K x N':>14}{'bf16 TFLOP/s':>14}{'fp8 tensorwise':>16}{'ratio':>8}{'fp8 rowwise':>13}"
          f"{'ratio':>8}")  # fmt: skip
    for name, (k, n) in LLAMA3_8B_LINEARS.items():
        _gemm_row(name, tokens, k, n, repeats)


def _gemm_row(name: str, tokens: int, k: int, n: int, repeats: int) -> None:
    a = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * tokens * k * n
    bf16 = _time(lambda: a @ b.t(), "cuda", repeats)
    aq, bq = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    rows_a, rows_b = torch.ones(tokens, 1, device="cuda"), torch.ones(n, 1, device="cuda")

    def tensorwise_mm():
        return padded_scaled_mm(aq, one, bq, one, torch.bfloat16, fast_accum=True)

    def rowwise_mm():
        return padded_scaled_mm(aq, rows_a, bq, rows_b, torch.bfloat16, fast_accum=True)

    tensorwise = _time(tensorwise_mm, "cuda", repeats)
    try:
        rowwise = _time(rowwise_mm, "cuda", repeats)
        row_text = f"{flops / rowwise / 1e12:>13.1f}{bf16 / rowwise:>7.2f}x"
    except RuntimeError as exc:
        row_text = f"{'n/a':>13}{'':>8}  ({str(exc).splitlines()[0][:40]})"
    print(f"{name:<10}{f'{k} x {n}':>14}{flops / bf16 / 1e12:>14.1f}{flops / tensorwise / 1e12:>16.1f}"
          f"{bf16 / tensorwise:>7.2f}x{row_text}")  # fmt: skip


def model_table(seq_len: int, batch: int, layers: int | None, repeats: int) -> None:
    from megalith.core import build_loss_fn, build_model_chunks, get_preset

    config = get_preset("llama3-1b") if layers is None else get_preset("llama3-1b", num_layers=layers)
    print(f"\nGPU, llama3-1b ({config.num_layers} layers), {batch} x {seq_len} tokens, bf16 parameters: "
          f"forward + backward")  # fmt: skip
    print(f"{'recipe':<12}{'ms / step':>12}{'tokens/s':>12}{'vs bf16':>9}")
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device="cuda")
    baseline = None
    for recipe in ("none", *RECIPES):
        fp8 = Fp8Config(recipe=recipe, matmul="scaled_mm") if recipe != "none" else None
        (model,) = build_model_chunks(config, fp8=fp8, device="cuda", dtype=torch.bfloat16)
        loss_fn = build_loss_fn(model)
        manager = Fp8Training([model], None, fp8 or Fp8Config())

        def step(model=model, loss_fn=loss_fn, manager=manager):
            model.zero_grad(set_to_none=True)
            loss_fn(model(ids[:, :-1]), ids[:, 1:]).mean().backward()
            manager.step()

        try:
            seconds = _time(step, "cuda", repeats)
        except RuntimeError as exc:  # e.g. a rowwise e5m2 matmul this GPU's _scaled_mm lacks
            print(f"{recipe:<12}{'n/a':>12}  ({str(exc).splitlines()[0][:90]})")
            continue
        baseline = baseline or seconds
        print(f"{'bf16' if recipe == 'none' else recipe:<12}{seconds * 1e3:>12.1f}{batch * seq_len / seconds:>12.0f}"
              f"{baseline / seconds:>8.2f}x")  # fmt: skip
        del model, loss_fn, manager
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="also run the GPU tables")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024, help="CPU: rows of x (tokens)")
    parser.add_argument("--hidden", type=int, default=1024, help="CPU: K = N of the linear")
    parser.add_argument("--gpu-tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=None, help="GPU model table: fewer layers than llama3-1b's")
    args = parser.parse_args()
    cpu_table(args.tokens, args.hidden, args.hidden, args.repeats)
    if args.cuda:
        if not torch.cuda.is_available():
            raise SystemExit("--cuda: torch sees no CUDA device")
        gemm_table(args.gpu_tokens, args.repeats)
        model_table(2048, 4, args.layers, args.repeats)


if __name__ == "__main__":
    main()
