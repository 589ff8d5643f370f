"""The native fp8 linear on a GPU: torch._scaled_mm (sm_89 and newer) against the float64 reference and against
the emulation on the same device; older GPUs fall back to the emulation."""

from __future__ import annotations

import pytest
import torch

from megalith.core.fp8 import ChunkScaling, Fp8Config
from megalith.core.fp8.gemm import scaled_mm_unsupported
from megalith.core.fp8.linear import LinearCasts, fp8_linear
from tests.core.fp8 import reference as ref

pytestmark = pytest.mark.cuda


def _casts(recipe, fmt, matmul):
    state = ChunkScaling(Fp8Config(recipe=recipe, format=fmt, matmul=matmul), ["layer"], "cuda")
    return LinearCasts("layer", state, 0, group=None, k_sharded=False, n_sharded=False)


def _supported(recipe: str, fmt: str) -> bool:
    dev, e4, e5 = torch.device("cuda", torch.cuda.current_device()), torch.float8_e4m3fn, torch.float8_e5m2
    grad = e5 if fmt == "hybrid" else e4
    rows = recipe == "rowwise"
    return all(scaled_mm_unsupported(dev, a, b, rows, torch.bfloat16) is None for a, b in ((e4, e4), (grad, e4)))


@pytest.mark.parametrize(("recipe", "fmt"), [("tensorwise", "hybrid"), ("delayed", "hybrid"), ("rowwise", "e4m3"),
                                             ("rowwise", "hybrid")])  # fmt: skip
def test_scaled_mm_on_the_gpu_matches_the_reference_and_the_emulation(recipe, fmt):
    if not _supported(recipe, fmt):
        pytest.skip(f"this GPU's torch._scaled_mm lacks {recipe} {fmt}")
    m, k, n = 256, 512, 384
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.05).bfloat16()
    g = (torch.randn(m, n, device="cuda", generator=gen) * 1e-3).bfloat16()
    outs = {}
    for mode in ("scaled_mm", "emulated"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, None, _casts(recipe, fmt, mode), training=True)
        y.backward(g)
        outs[mode] = (y, xr.grad, wr.grad)
    grad_fmt = "e5m2" if fmt == "hybrid" else "e4m3"
    ref.check_linear(
        dict(zip(("y", "dx", "dw"), outs["scaled_mm"], strict=True)), x, w, g, recipe, grad_fmt, torch.bfloat16
    )
    for a, b in zip(outs["scaled_mm"], outs["emulated"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))  # bf16 output rounding


def test_emulation_fallback_on_a_gpu_without_fp8_matmuls():
    dev = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(dev) >= (8, 9):
        pytest.skip("this GPU has fp8 tensor cores")
    x, w = torch.randn(32, 64, device="cuda"), torch.randn(48, 64, device="cuda")
    with pytest.warns(RuntimeWarning, match="no fp8 tensor cores"):
        fp8_linear(x, w, None, _casts("tensorwise", "hybrid", "auto"), training=False)
    with pytest.raises(RuntimeError, match="forbids the emulation"):
        fp8_linear(x, w, None, _casts("tensorwise", "hybrid", "scaled_mm"), training=False)
