"""The ops as torch operators: torch.compile(fullgraph=True), torch.library.opcheck, and bad-input errors."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalith.kernels import _C, ops
from megalith.kernels import reference as ref


def _block(x_BSH, norm_w, wq, wkv, w_gate, w_up, out_w, cos, sin, labels, *, m):
    """A tiny Llama-style block + loss written with the ops module `m` (ops or reference)."""
    batch, seq, hidden = x_BSH.shape
    h = m.rms_norm(x_BSH, norm_w, 1e-5)
    q = (h @ wq).view(batch, seq, 4, 16)
    k, v = (h @ wkv).view(batch, seq, 4, 16).split(2, dim=2)
    q, k = m.rope(q, cos, sin), m.rope(k, cos, sin)
    a = m.attention(q, k.contiguous(), v.contiguous(), True).reshape(batch, seq, hidden)
    x = x_BSH + a
    x = x + m.swiglu(x @ w_gate, x @ w_up) @ w_up.t()
    logits = x @ out_w
    return m.cross_entropy(logits, labels).mean()


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)

    def r(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    seq = 9
    angles = torch.arange(seq)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2) / 16)
    labels = torch.randint(0, 50, (2, seq), generator=g)
    labels[0, 0] = -100
    params = [r(2, seq, 64, scale=1.0), r(64) + 1, r(64, 64), r(64, 64), r(64, 96), r(64, 96), r(64, 50)]
    return params, angles.cos(), angles.sin(), labels


def test_compiled_block_matches_eager_and_reference():
    params, cos, sin, labels = _inputs()
    loss = _block(*params, cos, sin, labels, m=ops)
    grads = torch.autograd.grad(loss, params)
    compiled = torch.compile(_block, fullgraph=True)
    loss_c = compiled(*params, cos, sin, labels, m=ops)
    grads_c = torch.autograd.grad(loss_c, params)
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    params64 = [p.detach().double().requires_grad_() for p in params]
    loss_ref = _block(*params64, cos.double(), sin.double(), labels, m=ref)
    grads_ref = torch.autograd.grad(loss_ref, params64)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)


class _OpNames(TorchDispatchMode):
    """Records the name of every operator that reaches torch's dispatcher."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_run_the_kernels_directly_with_the_registered_ops_bits(monkeypatch):
    """Plain tensors outside torch.compile skip the custom op's dispatcher route (FusedOp), and get exactly the
    loss and gradients the registered ops give (the route torch.compile and tensor subclasses take)."""
    params, cos, sin, labels = _inputs()
    with _OpNames() as seen:
        loss = _block(*params, cos, sin, labels, m=ops)
        grads = torch.autograd.grad(loss, params)
    assert not {n for n in seen.names if n.startswith("megalith.")}, seen.names
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # FusedOp then calls the registered op
    with _OpNames() as seen:
        loss_op = _block(*params, cos, sin, labels, m=ops)
        grads_op = torch.autograd.grad(loss_op, params)
    used = {n.split(".")[1] for n in seen.names if n.startswith("megalith.")}
    assert used >= {"norm_fwd", "norm_bwd", "rope", "attention_fwd", "attention_bwd", "swiglu_fwd", "swiglu_bwd",
                    "cross_entropy_fwd", "cross_entropy_bwd"}, used  # fmt: skip
    assert torch.equal(loss, loss_op)
    for got, want in zip(grads, grads_op, strict=True):
        assert torch.equal(got, want)


def test_compiled_with_inductor_fullgraph():
    def f(x, w, gate, up, bias):
        return ops.bias_gelu(ops.rms_norm(x, w) + ops.swiglu(gate, up), bias).sum()

    g = torch.Generator().manual_seed(3)
    args = [torch.randn(4, 24, generator=g).requires_grad_() for _ in range(3)]
    x, gate, up = args
    w, bias = torch.randn(24, generator=g), torch.randn(24, generator=g)
    eager = f(x, w, gate, up, bias)
    eager_grads = torch.autograd.grad(eager, args)
    compiled = torch.compile(f, fullgraph=True)(x, w, gate, up, bias)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, args), eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def _opcheck_cases():
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    mask = torch.rand(2, 1, 1, 6, generator=g) < 0.3
    return [
        pytest.param(torch.ops.megalith.norm_fwd.default, (r(3, 20), r(20), r(20), 1e-5, False, True), id="norm"),
        pytest.param(torch.ops.megalith.softmax_fwd.default, (r(2, 2, 5, 6), mask, 0.5, True), id="softmax"),
        pytest.param(
            torch.ops.megalith.rope.default, (r(1, 4, 2, 8), r(4, 3).detach(), r(4, 3).detach(), True, False), id="rope"
        ),
        pytest.param(torch.ops.megalith.swiglu_fwd.default, (r(5, 7), r(5, 7)), id="swiglu"),
        pytest.param(torch.ops.megalith.bias_gelu_fwd.default, (r(5, 7), r(7), True), id="bias_gelu"),
        pytest.param(
            torch.ops.megalith.cross_entropy_fwd.default,
            (r(4, 9), torch.tensor([1, -100, 8, 0]), -100, 0.1),
            id="cross_entropy",
        ),
        pytest.param(
            torch.ops.megalith.attention_fwd.default,
            (r(1, 5, 2, 8), r(1, 7, 1, 8), r(1, 7, 1, 8), None, None, 5, 7, 0.3, True, 2, 0),
            id="attention",
        ),
        pytest.param(
            torch.ops.megalith.attention_fwd.default,
            (
                r(6, 2, 8),
                r(9, 1, 8),
                r(9, 1, 8),
                torch.tensor([0, 1, 6], dtype=torch.int32),
                torch.tensor([0, 4, 9], dtype=torch.int32),
                5,
                5,
                0.3,
                True,
                0,
                0,
            ),
            id="attention_varlen",
        ),
    ]


@pytest.mark.parametrize(("op", "args"), _opcheck_cases())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"x must be float32, float16 or bfloat16, got torch\.int32"):
        ops.rms_norm(x.int(), torch.ones(8))
    with pytest.raises(ValueError, match="CPU kernels take float32 or bfloat16, got float16"):
        ops.swiglu(x.half(), x.half())
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="bias must have the dtype of x"):
        ops.layer_norm(x, torch.ones(8), torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="up must match gate"):
        ops.swiglu(x, x[:2])
    with pytest.raises(ValueError, match="approximate must be"):
        ops.bias_gelu(x, None, "erf")
    with pytest.raises(ValueError, match="x must be \\[batch, heads, sq, sk\\]"):
        ops.scaled_softmax(x)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ops.scaled_softmax(x[None, None], mask=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.scaled_softmax(x[None, None], mask=torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="rotary width"):
        ops.rope(x.view(1, 4, 1, 8), torch.ones(4, 5), torch.ones(4, 5))
    with pytest.raises(ValueError, match="target must be int64"):
        ops.cross_entropy(x, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"target\[1\] = 8 is outside \[0, 8\)"):
        ops.cross_entropy(x, torch.tensor([0, 8, 1, 2]))
    q, kv = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 3, 16)
    with pytest.raises(ValueError, match=r"k/v heads \(3\) must divide the number of q heads \(4\)"):
        ops.attention(q, kv, kv)
    with pytest.raises(ValueError, match="k must be \\[batch=1, seq=5, heads_kv, head_dim=16\\]"):
        ops.attention(q, torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16))


def test_compiled_module_checks_layout_and_shapes():
    """The binding layer is the last line of defence: descriptors of the wrong layout or shape are refused."""
    x = torch.randn(8, 6)
    xt = x.t()  # non-contiguous view

    def desc(t):
        return (t.data_ptr(), 0, list(t.shape), list(t.stride()), -1)

    out, rstd = torch.empty(6, 8), torch.empty(6)
    with pytest.raises(ValueError, match="x must have a dense last dimension, got stride 6"):
        _C.kernels.norm_forward(desc(xt), desc(torch.ones(8)), None, desc(out), None, desc(rstd), 1e-5, True, False, 0)
    # Rows spaced by a stride are a CPU feature; on CUDA every argument must still be contiguous.
    rows = torch.randn(8, 12)[:, :6]
    cuda_desc = (rows.data_ptr(), 0, list(rows.shape), list(rows.stride()), 0)
    with pytest.raises(ValueError, match="x must be contiguous"):
        _C.kernels.norm_forward(cuda_desc, desc(torch.ones(6)), None, desc(x), None, desc(torch.empty(8)), 1e-5,
                                True, False, 0)  # fmt: skip
    with pytest.raises(ValueError, match="must have rows evenly spaced"):
        uneven = torch.randn(2, 5, 12)[:, :4, :6]  # rows 12 apart inside a block, blocks 60 apart
        _C.kernels.swiglu(desc(uneven), desc(uneven), None, desc(torch.empty(2, 4, 6)), None, None, 0)
    with pytest.raises(ValueError, match=r"rstd must have 8 elements, got 6"):
        _C.kernels.norm_forward(desc(x), desc(torch.ones(6)), None, desc(x), None, desc(rstd), 1e-5, True, False, 0)
    with pytest.raises(ValueError, match="eps must be positive"):
        _C.kernels.norm_forward(desc(x), desc(torch.ones(6)), None, desc(x), None, desc(torch.empty(8)), 0.0, True,
                                False, 0)  # fmt: skip


def test_noncontiguous_inputs_are_accepted_by_the_ops():
    x = torch.randn(6, 10).t()  # [10, 6], non-contiguous
    w = torch.randn(6)
    torch.testing.assert_close(ops.rms_norm(x, w), ref.rms_norm(x, w), rtol=1e-5, atol=1e-6)


def test_set_num_threads_keeps_results_identical():
    x, w, b = torch.randn(300, 77), torch.randn(77), torch.randn(77)
    results = []
    for threads in (1, 2, 3):
        ops.set_num_threads(threads)
        x_ = x.clone().requires_grad_()
        w_ = w.clone().requires_grad_()
        out = ops.layer_norm(x_, w_, b)
        out.backward(torch.ones_like(out))
        results.append((out, x_.grad, w_.grad))
    ops.set_num_threads(None)
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            assert torch.equal(a, c), "results depend on the number of CPU threads"
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        ops.set_num_threads(0)


def test_cpu_attention_memory_does_not_grow_with_seq_squared():
    """An 8k-token causal attention would need 256 MiB for one S x S float32 score matrix; the tiled kernel
    must stay far below that (measured as the peak RSS growth of a fresh process)."""
    code = (
        "import resource, torch\n"
        "from megalith.kernels import ops\n"
        "q, k, v = (torch.randn(1, 8192, 1, 16) for _ in range(3))\n"
        "ops.attention(q[:, :64], k[:, :64], v[:, :64])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = ops.attention(q, k, v, True)\n"
        "assert torch.isfinite(out).all()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    grown_mib = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert grown_mib < 64, f"peak memory grew by {grown_mib} MiB during an 8k-token attention"


def _gradcheck_cases():
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    angles = r(5, 3)
    mask = torch.rand(1, 1, 1, 6, generator=g) < 0.3
    target = torch.tensor([3, -100, 0, 8])
    return [
        pytest.param(lambda x, w: ops.rms_norm(x, w, 1e-5, True), (r(3, 12), r(12)), id="rms_norm"),
        pytest.param(lambda x, w, b: ops.layer_norm(x, w, b), (r(3, 12), r(12), r(12)), id="layer_norm"),
        pytest.param(lambda x: ops.scaled_softmax(x, 0.5, True, mask), (r(1, 2, 4, 6),), id="scaled_softmax"),
        pytest.param(lambda x: ops.rope(x, angles.cos(), angles.sin(), True), (r(1, 5, 2, 10),), id="rope"),
        pytest.param(ops.swiglu, (r(4, 6), r(4, 6)), id="swiglu"),
        pytest.param(lambda x, b: ops.bias_gelu(x, b, "none"), (r(4, 6), r(6)), id="bias_gelu"),
        pytest.param(lambda x: ops.cross_entropy(x, target, -100, 0.1), (r(4, 9),), id="cross_entropy"),
        pytest.param(
            lambda q, k, v: ops.attention(q, k, v, True), (r(1, 6, 2, 4), r(1, 6, 1, 4), r(1, 6, 1, 4)), id="attention"
        ),
    ]


@pytest.mark.parametrize(("fn", "inputs"), _gradcheck_cases())
def test_gradcheck_float32(fn, inputs):
    """Finite differences of the kernel's own forward against its backward. The kernels take no float64, so
    this runs in float32 with a step and tolerance sized for it."""
    inputs = tuple(t.clone().requires_grad_() for t in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gradcheck warns about non-double inputs
        assert torch.autograd.gradcheck(fn, inputs, eps=2e-3, atol=2e-3, rtol=2e-2, fast_mode=False)
