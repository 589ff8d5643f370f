"""CPU-only paths of the fused kernels: strided views read in place, every instruction-set copy, threading."""

from __future__ import annotations

import pytest
import torch

from megalith.kernels import _C, ops
from megalith.kernels import reference as ref
from megalith.kernels._dispatch import _inner_dense, _rows
from tests.kernels import test_attention, test_ops
from tests.kernels.reference_check import compare

ISAS = [name for name in ("base", "avx2", "avx512") if _C.kernels.cpu_isa_available(name)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)


@pytest.fixture
def isa(request):
    _C.kernels.set_cpu_isa(request.param)
    yield request.param
    _C.kernels.set_cpu_isa("auto")


def _run(fn, base, make_views, grad, contiguous):
    """fn applied to views of `base` (or contiguous copies of them): the output and the gradient of `base`."""
    leaf = base.detach().clone().requires_grad_()
    views = [v.contiguous() if contiguous else v for v in make_views(leaf)]
    out = fn(*views)
    out.backward(grad)
    return out.detach(), leaf.grad


# ---- strided views -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_are_read_in_place_and_match_contiguous_inputs(dtype):
    """Inputs laid out as the model hands them over: q of a fused qkv projection, the gate/up halves of fc1,
    the logits of a padded vocabulary; the output gradients are strided views as well."""
    b, s, n, d, f, v = 2, 6, 4, 16, 40, 300
    qkv, h = torch.randn(b, s, 2 * n * d, dtype=dtype), torch.randn(b, s, 2 * f, dtype=dtype)
    logits, target = torch.randn(b, s, v + 84, dtype=dtype) * 3, torch.randint(0, v, (b, s))
    angles = torch.arange(s)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
    ones = torch.ones(f, dtype=dtype)

    def q_of(t):
        return [t[..., : n * d].view(b, s, n, d)]

    def halves(t):
        return list(t.chunk(2, dim=-1))

    cases = [  # (op, base tensor, the views of it the op gets, how its wrapper passes them on)
        (lambda x: ops.rope(x, angles.cos(), angles.sin()), qkv, q_of, _inner_dense),
        (ops.swiglu, h, halves, _rows),
        (lambda x, _: ops.bias_gelu(x, None), h, halves, _rows),
        (lambda x, _: ops.rms_norm(x, ones), h, halves, _rows),
        (lambda _, x: ops.layer_norm(x, ones), h, halves, _rows),
        (lambda x: ops.cross_entropy(x, target), logits, lambda t: [t[..., :v]], _rows),
    ]
    for fn, base, make_views, passed_on in cases:
        views = make_views(base)
        assert not views[0].is_contiguous()
        assert all(passed_on(view) is view for view in views), "the wrapper copied a view"
        shape = fn(*views).shape
        grad = torch.randn(*shape[:-1], shape[-1] + 3, dtype=dtype)[..., : shape[-1]]
        if len(shape) == 2:  # cross_entropy: one float32 loss per token
            grad = torch.randn(shape[0], 2 * shape[1])[:, ::2]
        got = _run(fn, base, make_views, grad, contiguous=False)
        want = _run(fn, base, make_views, grad.contiguous(), contiguous=True)
        for a, c in zip(got, want, strict=True):
            assert torch.equal(a, c), "a strided view gave different values than its contiguous copy"


def test_strided_descriptors_reach_the_kernels():
    """The compiled module itself takes the row stride: no copy happens anywhere on the way."""
    h = torch.randn(3, 5, 24)
    gate, up = h.chunk(2, dim=-1)

    def desc(t):
        return (t.data_ptr(), 0, list(t.shape), list(t.stride()), -1)

    out = torch.empty(3, 5, 12)
    _C.kernels.swiglu(desc(gate), desc(up), None, desc(out), None, None, 0)
    torch.testing.assert_close(out, ref.swiglu(gate, up), rtol=1e-6, atol=1e-6)


def test_views_the_kernels_cannot_stride_are_copied():
    x = torch.randn(6, 10).t()  # the last dimension is not dense
    assert _rows(x) is not x and _rows(x).is_contiguous()
    uneven = torch.randn(2, 5, 12)[:, :4, :6]  # leading dimensions that do not merge into one row stride
    assert _rows(uneven) is not uneven
    w = torch.randn(6)
    torch.testing.assert_close(ops.rms_norm(uneven, w), ref.rms_norm(uneven, w), rtol=1e-5, atol=1e-6)


# ---- every instruction-set copy ----------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_instruction_set_matches_the_reference(isa, dtype):
    """The dispatcher picks the widest copy this CPU has; the others are checked here by forcing them.
    Odd sizes exercise the vector loops' remainders."""
    assert ops.cpu_isa() == isa
    test_ops.test_rms_norm("cpu", dtype, (3, 37), True)
    test_ops.test_layer_norm("cpu", dtype, (2, 5, 128), True, False)
    test_ops.test_layer_norm("cpu", dtype, (2, 1000), True, False)  # 64-lane blocks and a 40-wide tail
    test_ops.test_scaled_softmax("cpu", dtype, (1, 2, 5, 13), True, True)
    test_ops.test_rope("cpu", dtype, (1, 13, 2, 40), 24, False)
    test_ops.test_rope("cpu", dtype, (2, 7, 3, 64), 64, True)
    test_ops.test_swiglu("cpu", dtype, (5000,))
    test_ops.test_bias_gelu("cpu", dtype, (3, 37), "tanh", True)
    test_ops.test_bias_gelu("cpu", dtype, (3, 37), "none", False)
    test_ops.test_cross_entropy("cpu", dtype, (2, 9), 1000, 0.1)
    test_ops.test_vocab_parallel_pieces_combine_to_the_full_loss("cpu", dtype, 0.2)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_instruction_set_computes_attention(isa, dtype):
    """Attention forward and backward per copy. The head dims cover every column block of the tile products
    (8 -> one block of 16, 40 -> 48, 100 -> 64 + 48, 160 -> 2 x 64 + 32); the lengths cover partial tiles, causal
    offsets, rows that see no key and packed sequences."""
    assert ops.cpu_isa() == isa
    for dim in (8, 40, 100, 160):
        test_attention.test_dense_out_and_lse("cpu", dtype, 2, 70, 67, 4, 2, dim, True, 3, 20)
    test_attention.test_dense_out_and_lse("cpu", dtype, 1, 33, 130, 2, 1, 64, False, 0, 0)
    test_attention.test_varlen_matches_each_sequence_alone("cpu", dtype, 4, 2, 64, True)
    test_attention.test_rows_that_see_no_key("cpu", dtype)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_extreme_inputs_stay_exact_at_the_limits(isa):
    """The vectorised exp saturates: exp(-inf) = 0, huge arguments give inf, so softmax, cross-entropy and
    SiLU keep their exact limits instead of NaN."""
    logits = torch.tensor([[0.0, -float("inf"), 1e4, -1e4], [3.0, 2.0, -float("inf"), 1.0]])
    target = torch.tensor([2, 0])
    compare(ops.cross_entropy, lambda x, t: ref.cross_entropy(x, t).float(), [logits, target], [0])
    scores = torch.tensor([[[[-1e4, 0.0, 80.0, 1e4], [-100.0, -95.0, -200.0, -90.0]]]])
    compare(lambda x: ops.scaled_softmax(x, 1.0), lambda x: ref.scaled_softmax(x, 1.0), [scores], [0])
    gate = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4])
    out = ops.swiglu(gate, torch.ones_like(gate))
    torch.testing.assert_close(out, torch.nn.functional.silu(gate), rtol=2e-7, atol=0.0)
    nan = ops.swiglu(torch.tensor([float("nan")]), torch.ones(1))
    assert torch.isnan(nan).all()


def test_unknown_or_unsupported_instruction_sets_are_refused():
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'; expected auto, base, avx2 or avx512"):
        ops.set_cpu_isa("sse9")
    missing = [name for name in ("avx2", "avx512") if name not in ISAS]
    for name in missing:
        with pytest.raises(ValueError, match=f"cannot use {name}"):
            ops.set_cpu_isa(name)
    ops.set_cpu_isa("auto")
    assert ops.cpu_isa() == ISAS[-1]


# ---- threading ---------------------------------------------------------------------------------------------


def test_kernels_run_on_torchs_openmp_team_and_follow_its_thread_count():
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch does not use OpenMP")
    before = torch.get_num_threads()
    try:
        ops.set_num_threads(None)
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert ops.cpu_threading() == ("openmp", threads)
        ops.set_num_threads(2)
        assert ops.cpu_threading() == ("openmp", 2), "an explicit count overrides torch's"
    finally:
        ops.set_num_threads(None)
        torch.set_num_threads(before)


def _threaded_results():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 96, generator=g).requires_grad_()
    logits = torch.randn(300, 1000, generator=g).requires_grad_()
    target = torch.randint(0, 1000, (300,), generator=g)
    out = ops.layer_norm(x, torch.ones(96), torch.zeros(96))
    loss = ops.cross_entropy(logits, target)
    torch.autograd.backward([out, loss], [torch.ones_like(out), torch.ones_like(loss)])
    return [out, x.grad, loss, logits.grad]


def test_results_do_not_depend_on_the_thread_backend():
    baseline = _threaded_results()
    try:
        for openmp, threads in ((False, 2), (False, 3), (True, 3)):
            _C.kernels.use_openmp(openmp)
            ops.set_num_threads(threads)
            assert ops.cpu_threading()[0] == ("openmp" if openmp else "std::thread")
            for got, want in zip(_threaded_results(), baseline, strict=True):
                assert torch.equal(got, want)
    finally:
        _C.kernels.use_openmp("ATen parallel backend: OpenMP" in torch.__config__.parallel_info())
        ops.set_num_threads(None)


@pytest.mark.parametrize("openmp", [True, False])
def test_an_error_inside_a_parallel_region_reaches_python(openmp):
    logits = torch.randn(8192, 8)  # 8 columns: thousands of rows per thread, so the rows are split
    target = torch.zeros(8192, dtype=torch.int64)
    target[-1] = 99  # a row of the last thread
    try:
        _C.kernels.use_openmp(openmp)
        ops.set_num_threads(2)
        with pytest.raises(ValueError, match=r"target\[8191\] = 99 is outside \[0, 8\)"):
            ops.cross_entropy(logits, target)
    finally:
        _C.kernels.use_openmp("ATen parallel backend: OpenMP" in torch.__config__.parallel_info())
        ops.set_num_threads(None)


def test_set_num_threads_rejects_bad_counts():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_threads must be"):
            ops.set_num_threads(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_attention_backward_schedules_give_the_same_bits(dtype):
    """The backward pass runs one task per (sequence, kv head) when there are at least 4 such pairs per thread,
    else finer tasks that recompute the score tiles. Both add every term in the same order: a batch (one pass)
    and each of its sequences alone (two passes) give bit-identical gradients."""
    ops.set_num_threads(1)
    try:
        q, k, v = (torch.randn(4, 100, h, 40, dtype=dtype) for h in (4, 1, 1))
        grad = torch.randn(4, 100, 4, 40, dtype=dtype)

        def grads(batch):
            leaves = [t[batch].detach().clone().requires_grad_() for t in (q, k, v)]
            ops.attention(*leaves, True, None).backward(grad[batch])
            return [t.grad for t in leaves]

        together = grads(slice(0, 4))
        for b in range(4):
            for whole, alone in zip(together, grads(slice(b, b + 1)), strict=True):
                assert torch.equal(whole[b : b + 1], alone)
    finally:
        ops.set_num_threads(None)
