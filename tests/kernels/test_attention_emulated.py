"""The CUDA attention kernels (cpp/kernels/cuda/attention*), compiled for the host with the SIMT emulator of
tests/kernels/cuda_emulator and checked against the float64 reference: the float32 scalar path and the
float16/bfloat16 tensor-core path (mma.sync, ldmatrix, cp.async emulated from the PTX ISA semantics), dense and
varlen, forward and backward through out and lse. It checks the kernels' indexing, masking, double buffering
and fragment layouts on a machine without a GPU, and faults on misaligned or out-of-range accesses; it says
nothing about speed and does not replace the `cuda`-marked tests on a real GPU.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from megalith.kernels import reference as ref
from tests.kernels.reference_check import assert_within_rule

pytestmark = pytest.mark.slow  # builds a C++ library (about a minute) and emulates every GPU thread

_HERE = Path(__file__).resolve().parent
_EMULATOR = _HERE / "cuda_emulator"
_REPO = _HERE.parents[1]
_SOURCES = ["attention_fwd.cu", "attention_bwd.cu", "attention_mma_fwd.cu", "attention_mma_bwd.cu", "launch.cu"]
_HEADERS = ["attention.cuh", "attention_mma.cuh", "common.cuh"]
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_GUARD = 64  # elements of sentinel on each side of every output buffer


def _host_source(text: str) -> str:
    """CUDA-only syntax rewritten for the emulator: dynamic shared memory and <<<...>>> launches."""
    text = text.replace(
        "extern __shared__ __align__(128) unsigned char smem[];", "unsigned char* smem = ::emu::dynamic_smem();"
    )
    text = re.sub(r"^(\s*)(.+?)<<<(.+?)>>>\((.*)\);$", r"\1::emu::launch(\2, \3, \4);", text, flags=re.M)
    assert "<<<" not in text, "a kernel launch the emulator build cannot rewrite"
    return text


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    build = tmp_path_factory.mktemp("cuda_emulator")
    for name in [*_SOURCES, *_HEADERS]:
        (build / name).write_text(_host_source((_REPO / "cpp/kernels/cuda" / name).read_text()))
    shutil.copy(_EMULATOR / "ptx.cuh", build / "ptx.cuh")  # the emulated instructions replace the inline PTX
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w", f"-I{_EMULATOR / 'include'}", f"-I{_EMULATOR}"]
    flags += [f"-I{build}", f"-I{_REPO / 'cpp/include'}"]
    sources = [build / name for name in _SOURCES] + [_EMULATOR / "driver.cpp"]

    def compile_one(src: Path) -> Path:
        obj = build / (src.name + ".o")
        subprocess.run([compiler, *flags, "-x", "c++", "-c", str(src), "-o", str(obj)], check=True)
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(compile_one, sources))
    library = build / "libattention_emulated.so"
    subprocess.run([compiler, "-shared", "-pthread", *map(str, objects), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def _guarded(shape, dtype):
    """An output buffer with sentinel guards on both sides; returns (view, full buffer)."""
    numel = math.prod(shape)
    full = torch.full((numel + 2 * _GUARD,), -7.0, dtype=dtype)
    return full[_GUARD : _GUARD + numel].view(shape), full


def _check_guards(full: torch.Tensor, name: str) -> None:
    guards = torch.cat([full[:_GUARD], full[-_GUARD:]])
    assert torch.all(guards == -7.0), f"{name}: the kernel wrote outside the tensor"


class Emulated:
    """ops.attention_with_lse semantics on the emulated CUDA kernels (inputs are CPU tensors)."""

    def __init__(self, lib, q, k, v, causal, scale, shift, cu_q=None, cu_k=None):
        self.lib, self.q, self.k, self.v = lib, q.contiguous(), k.contiguous(), v.contiguous()
        self.cu_q, self.cu_k = cu_q, (cu_q if cu_k is None else cu_k)
        self.causal, self.scale = causal, scale
        varlen = cu_q is not None
        if varlen:
            lengths = (self.cu_q[1:] - self.cu_q[:-1], self.cu_k[1:] - self.cu_k[:-1])
            batch, (seq_q, seq_k) = len(self.cu_q) - 1, (int(n.max()) if len(n) else 0 for n in lengths)
            total_q, total_k, heads_q, heads_kv = q.shape[0], k.shape[0], q.shape[1], k.shape[1]
            self.lse_shape = (heads_q, total_q)
        else:
            batch, seq_q, seq_k, heads_q, heads_kv = q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]
            total_q, total_k = batch * seq_q, batch * seq_k
            self.lse_shape = (batch, heads_q, seq_q)
        sizes = [batch, seq_q, seq_k, total_q, total_k, heads_q, heads_kv, q.shape[-1], shift]
        self.sizes = (ctypes.c_int64 * 9)(*sizes)

    def _call(self, fn, *args):
        self.lib.emu_clear_buffers()
        for t in (self.q, self.k, self.v, *(a for a in args if isinstance(a, torch.Tensor))):
            self.lib.emu_add_buffer(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(t.numel() * t.element_size()))
        err = ctypes.create_string_buffer(1024)
        ptrs = [None if a is None else ctypes.c_void_p(a.data_ptr()) for a in args]
        cu = [None if c is None else ctypes.c_void_p(c.data_ptr()) for c in (self.cu_q, self.cu_k)]
        code = _DTYPE_CODES[self.q.dtype]
        status = fn(*ptrs, *cu, self.sizes, ctypes.c_float(self.scale), int(self.causal), code, err, 1024)
        assert status == 0, err.value.decode()

    def forward(self):
        out, out_full = _guarded(self.q.shape, self.q.dtype)
        lse, lse_full = _guarded(self.lse_shape, torch.float32)
        self._call(self.lib.emu_attention_forward, self.q, self.k, self.v, out, lse)
        _check_guards(out_full, "out"), _check_guards(lse_full, "lse")
        return out, lse

    def backward(self, out, lse, grad_out, grad_lse):
        grads = [_guarded(t.shape, t.dtype) for t in (self.q, self.k, self.v)]
        delta, delta_full = _guarded(self.lse_shape, torch.float32)
        grad_out = grad_out.contiguous()
        self._call(
            self.lib.emu_attention_backward, self.q, self.k, self.v, out, grad_out, lse, grad_lse, delta,
            *(g for g, _ in grads),
        )  # fmt: skip
        for (_, full), name in zip(grads, ("dq", "dk", "dv"), strict=True):
            _check_guards(full, name)
        _check_guards(delta_full, "delta")
        return [g for g, _ in grads]


def _reference(q, k, v, dtype, causal, scale, q_offset, cu_q, cu_k, grad_out, grad_lse):
    """(out, lse, dq, dk, dv) of the reference in `dtype` (float64: the ground truth)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = ref.attention_with_lse(
        *leaves, causal, scale, q_offset=q_offset, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )  # fmt: skip
    seen = torch.isfinite(lse)
    torch.autograd.backward([out, lse], [grad_out.to(dtype), torch.where(seen, grad_lse.to(lse.dtype), 0)])
    return [out, lse, *(t.grad for t in leaves)]


def _run_case(lib, dtype, q, k, v, causal, q_offset, cu_q=None, cu_k=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    emulated = Emulated(lib, q, k, v, causal, scale, q_offset, cu_q, cu_k)
    out, lse = emulated.forward()
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, dtype=torch.float64)
    grad_lse_f32 = torch.where(torch.isfinite(lse), grad_lse, 0).float().contiguous()
    grads = emulated.backward(out, lse, grad_out.to(dtype), grad_lse_f32)
    expected = _reference(q, k, v, torch.float64, causal, scale, q_offset, cu_q, cu_k, grad_out, grad_lse)
    baseline = _reference(q, k, v, dtype, causal, scale, q_offset, cu_q, cu_k, grad_out, grad_lse)
    for name, got, want, base in zip(
        ("out", "lse", "dq", "dk", "dv"), [out, lse, *grads], expected, baseline, strict=True
    ):
        assert_within_rule(name, got, want.detach(), base.detach())


def _inputs(tokens_q, tokens_k, heads_q, heads_kv, dim, dtype, batch=None):
    lead_q, lead_k = ((batch, tokens_q), (batch, tokens_k)) if batch else ((tokens_q,), (tokens_k,))
    q = torch.randn(*lead_q, heads_q, dim, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(*lead_k, heads_kv, dim, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, k, v


DTYPES = [
    pytest.param(torch.float32, id="fp32-scalar"),
    pytest.param(torch.float16, id="fp16-mma"),
    pytest.param(torch.bfloat16, id="bf16-mma"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(2024)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128])
def test_emulated_varlen_causal_gqa(lib, dtype, dim):
    """Packed sequences of 1, 40 and 150 tokens (three 64-key tiles: the double buffer wraps), causal, query
    heads sharing kv heads. To keep the emulation short, D = 128 runs 2 query heads on 1 (not 4 on 2), and the
    float32 path (32-key tiles, emulated far more slowly) 1, 40 and 100 tokens."""
    lengths = [1, 40, 100] if dtype == torch.float32 else [1, 40, 150]
    heads = (4, 2) if dim == 64 and dtype != torch.float32 else (2, 1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _inputs(sum(lengths), sum(lengths), *heads, dim, dtype)
    _run_case(lib, dtype, q, k, v, True, 0, cu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_dense_offsets_and_full(lib, dtype):
    """Dense batch with Sq != Sk: causal in global positions (some rows see no key), then full attention."""
    seq_q, seq_k = (40, 70) if dtype == torch.float32 else (70, 100)
    q, k, v = _inputs(seq_q, seq_k, 2, 1, 64, dtype, batch=2)
    _run_case(lib, dtype, q, k, v, True, -20)
    _run_case(lib, dtype, q, k, v, False, 0)


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_emulated_varlen_cross_lengths(lib, dtype):
    """Per-sequence query and key counts differ (including a sequence without queries and one without keys)."""
    cu_q = torch.tensor([0, 5, 5, 75, 76], dtype=torch.int32)
    cu_k = torch.tensor([0, 80, 83, 153, 153], dtype=torch.int32)
    q, k, v = _inputs(76, 153, 2, 2, 128, dtype)
    _run_case(lib, dtype, q, k, v, True, 10, cu_q, cu_k)
