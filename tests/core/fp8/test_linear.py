"""An fp8 linear's forward and backward against a float64 reference of the same recipe, on torch._scaled_mm
(where it runs) and on its emulation; the emulation fallback and its refusal."""

from __future__ import annotations

import warnings

import pytest
import torch

from megalith.core.fp8 import ChunkScaling, Fp8Config
from megalith.core.fp8 import gemm as gemm_module
from megalith.core.fp8.gemm import emulated_mm, padded_scaled_mm, scaled_mm_unsupported
from megalith.core.fp8.linear import LinearCasts, fp8_linear
from tests.core.fp8 import reference as ref

E4M3 = torch.float8_e4m3fn
CPU_SCALED_MM = scaled_mm_unsupported(torch.device("cpu"), E4M3, E4M3, False, torch.float32) is None
needs_cpu_scaled_mm = pytest.mark.skipif(not CPU_SCALED_MM, reason="this torch has no torch._scaled_mm on the CPU")


def _require_cpu_scaled_mm(rowwise: bool, fmt: str = "hybrid", out_dtype: torch.dtype = torch.float32) -> None:
    """Skips unless torch._scaled_mm runs on the CPU with that scaling for each operand pair the format's forward
    and backward use (torch 2.11's CPU kernel has per-tensor scales only; 2.13's has rowwise too)."""
    grad = torch.float8_e5m2 if fmt == "hybrid" else E4M3
    for a, b in ((E4M3, E4M3), (grad, E4M3), (E4M3, grad)):
        reason = scaled_mm_unsupported(torch.device("cpu"), a, b, rowwise, out_dtype)
        if reason is not None:
            pytest.skip(f"{reason} ({'rowwise' if rowwise else 'tensorwise'} scales, {a} x {b})")


def _casts(recipe: str, fmt: str = "hybrid", matmul: str = "emulated") -> LinearCasts:
    config = Fp8Config(recipe=recipe, format=fmt, matmul=matmul)
    state = ChunkScaling(config, ["layers.0.mlp.fc1"])
    return LinearCasts("layers.0.mlp.fc1", state, 0, group=None, k_sharded=False, n_sharded=False)


def _run(casts, x, w, b, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fp8_linear(x, w, b, casts, training=True)
    y.backward(g)
    return y, x.grad, w.grad


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "rowwise"])
@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
@pytest.mark.parametrize("matmul", ["emulated", pytest.param("scaled_mm", marks=needs_cpu_scaled_mm)])
@pytest.mark.parametrize(("shape", "dtype"), [((32, 64, 48), torch.float32), ((10, 40, 24), torch.float32),
                                              ((32, 64, 48), torch.bfloat16)])  # fmt: skip
def test_fp8_linear_matches_the_float64_reference(recipe, fmt, matmul, shape, dtype):
    if matmul == "scaled_mm":
        _require_cpu_scaled_mm(recipe == "rowwise", fmt, dtype)
    m, k, n = shape
    gen = torch.Generator().manual_seed(m + k + n + len(recipe))
    x = (torch.randn(2, m // 2, k, generator=gen) * 3).to(dtype)  # [B, S, K]: the layer flattens B and S
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    g = (torch.randn(2, m // 2, n, generator=gen) * 1e-3).to(dtype)
    casts = _casts(recipe, fmt, matmul)
    y, dx, dw = _run(casts, x, w, b, g)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    grad_fmt = "e5m2" if fmt == "hybrid" else "e4m3"
    x2, g2 = x.reshape(m, k), g.reshape(m, n)
    outputs = {"y": y.reshape(m, n).double() - b.double(), "dx": dx.reshape(m, k), "dw": dw}
    ref.check_linear(outputs, x2, w, g2, recipe, grad_fmt, dtype)
    # fp8 really is coarser than the parameter dtype: the result is not the high-precision product.
    a, b_ = ref.linear_operands(x2, w, g2, recipe, grad_fmt)["y"]
    assert float(abs(a @ b_ - ref.to_f64(x2) @ ref.to_f64(w).T).max()) > 1e-3


@needs_cpu_scaled_mm
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_scaled_mm_and_the_emulation_agree(recipe):
    _require_cpu_scaled_mm(recipe == "rowwise")
    gen = torch.Generator().manual_seed(7)
    x, w, g = torch.randn(4, 9, 40, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(4, 9, 24)
    outs = [_run(_casts(recipe, matmul=mode), x, w, None, g) for mode in ("scaled_mm", "emulated")]
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32 summation order only


@needs_cpu_scaled_mm
@pytest.mark.parametrize(("m", "k", "n"), [(16, 32, 48), (5, 7, 3), (33, 17, 50)])
@pytest.mark.parametrize("rowwise", [False, True])
def test_padding_to_multiples_of_16_changes_nothing(m, k, n, rowwise):
    _require_cpu_scaled_mm(rowwise)
    gen = torch.Generator().manual_seed(m * k * n)
    a, b = torch.randn(m, k, generator=gen).to(E4M3), torch.randn(n, k, generator=gen).to(torch.float8_e5m2)
    shape_a, shape_b = ((m, 1), (n, 1)) if rowwise else ((), ())
    sa, sb = torch.rand(shape_a, generator=gen) + 0.5, torch.rand(shape_b, generator=gen) + 0.5
    out = padded_scaled_mm(a, sa, b, sb, torch.float32)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, emulated_mm(a, sa, b, sb, torch.float32), rtol=1e-5, atol=1e-5)


def test_auto_emulates_on_the_cpu_silently(monkeypatch):
    def no_scaled_mm(*args, **kwargs):
        raise AssertionError("matmul='auto' ran torch._scaled_mm on the CPU")

    monkeypatch.setattr(gemm_module, "padded_scaled_mm", no_scaled_mm)
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fp8_linear(x, w, None, _casts("tensorwise", matmul="auto"), training=False)
    torch.testing.assert_close(y, fp8_linear(x, w, None, _casts("tensorwise", matmul="emulated"), training=False))


def test_missing_scaled_mm_falls_back_with_one_warning_or_errors_when_forbidden(monkeypatch):
    # as on a GPU without fp8 tensor cores: 'auto' tries _scaled_mm there
    monkeypatch.setattr(gemm_module, "auto_tries_scaled_mm", lambda device: True)
    monkeypatch.setattr(gemm_module, "scaled_mm_unsupported", lambda *args: "sm_80 has no fp8 tensor cores")
    gemm_module._warn_once.cache_clear()
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    with pytest.warns(RuntimeWarning) as caught:
        fp8_linear(x, w, None, _casts("tensorwise", matmul="auto"), training=False)
        fp8_linear(x, w, None, _casts("tensorwise", matmul="auto"), training=False)
    assert len(caught) == 1, "one warning, not one per matmul"
    message = str(caught[0].message)
    assert "\n" not in message and "sm_80 has no fp8 tensor cores" in message and "emulating" in message
    with pytest.raises(RuntimeError, match=r"fp8 layer layers\.0\.mlp\.fc1: sm_80 has no fp8 tensor cores .*"
                                           r"fp8\.matmul=scaled_mm forbids the emulation"):  # fmt: skip
        fp8_linear(x, w, None, _casts("tensorwise", matmul="scaled_mm"), training=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp8_linear(x, w, None, _casts("tensorwise", matmul="emulated"), training=False)
