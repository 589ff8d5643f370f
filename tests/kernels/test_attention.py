"""attention_with_lse (dense, offset-causal and packed/varlen), forward and backward through out and lse, against
a float64 reference that runs each sequence on its own (STYLE.md tolerance rule); ring-attention merging;
bad inputs. The same tests run on CPU (float32, bfloat16) and, marked `cuda`, on a GPU (float32 on the scalar
path, float16/bfloat16 on the tensor-core kernels).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from megalith.kernels import ops
from megalith.kernels import reference as ref
from tests.kernels.reference_check import assert_within_rule, compare

CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
]


def randn(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)


def _with_kwargs(fn, **kwargs):
    return lambda q, k, v, causal, scale: fn(q, k, v, causal, scale, **kwargs)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(
    ("batch", "seq_q", "seq_k", "heads_q", "heads_kv", "dim"),
    [(2, 70, 70, 4, 2, 64), (1, 33, 130, 2, 1, 128), (2, 129, 40, 4, 4, 64), (1, 9, 5, 3, 1, 16)],
)
@pytest.mark.parametrize(
    ("causal", "q_offset", "k_offset"), [(True, 0, 0), (False, 0, 0), (True, 50, 10), (True, 3, 20)]
)
def test_dense_out_and_lse(device, dtype, batch, seq_q, seq_k, heads_q, heads_kv, dim, causal, q_offset, k_offset):
    """Out and lse, and gradients through both, for Sq != Sk and causal masks in global positions (queries at
    q_offset + i, keys at k_offset + j; with k_offset > q_offset the first queries see no key at all)."""
    if device == "cuda" and dim not in (64, 128):
        pytest.skip("CUDA kernels are built for head_dim 64 and 128")
    q = randn(batch, seq_q, heads_q, dim, device=device, dtype=dtype)
    k = randn(batch, seq_k, heads_kv, dim, device=device, dtype=dtype)
    v = randn(batch, seq_k, heads_kv, dim, device=device, dtype=dtype)
    kwargs = {"q_offset": q_offset, "k_offset": k_offset}
    compare(
        _with_kwargs(ops.attention_with_lse, **kwargs), _with_kwargs(ref.attention_with_lse, **kwargs), [q, k, v],
        [0, 1, 2], causal, None,
    )  # fmt: skip


def _packed(lengths_q, lengths_k, heads_q, heads_kv, dim, device, dtype):
    q = randn(sum(lengths_q), heads_q, dim, device=device, dtype=dtype)
    k = randn(sum(lengths_k), heads_kv, dim, device=device, dtype=dtype)
    v = randn(sum(lengths_k), heads_kv, dim, device=device, dtype=dtype)
    return q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("heads_q", "heads_kv", "dim"), [(4, 2, 64), (2, 1, 128), (3, 3, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_each_sequence_alone(device, dtype, heads_q, heads_kv, dim, causal):
    """Packed sequences of uneven lengths (1, tile-edge and multi-tile ones) attend only within themselves."""
    lengths = [1, 37, 64, 130, 2, 65]
    q, k, v, cu, _ = _packed(lengths, lengths, heads_q, heads_kv, dim, device, dtype)
    kwargs = {"cu_seqlens_q": cu, "cu_seqlens_k": cu}
    compare(
        _with_kwargs(ops.attention_with_lse, **kwargs), _with_kwargs(ref.attention_with_lse, **kwargs), [q, k, v],
        [0, 1, 2], causal, None,
    )  # fmt: skip


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("causal", "q_offset", "k_offset"), [(True, 0, 0), (True, 70, 0), (False, 0, 0)])
def test_varlen_with_different_query_and_key_lengths(device, dtype, causal, q_offset, k_offset):
    """Each sequence's queries may be fewer than its keys (or none, or see none), given max_seqlen explicitly."""
    lengths_q, lengths_k = [5, 0, 70, 1, 33], [80, 3, 71, 0, 40]
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 64, device, dtype)
    kwargs = {"q_offset": q_offset, "k_offset": k_offset, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    compare(
        _with_kwargs(ops.attention_with_lse, max_seqlen_q=70, max_seqlen_k=80, **kwargs),
        _with_kwargs(ref.attention_with_lse, **kwargs), [q, k, v], [0, 1, 2], causal, 0.2,
    )  # fmt: skip


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_varlen_equals_dense_when_sequences_are_equal(device, dtype):
    """A packed batch of equal-length sequences is the dense batch: same out, and lse [Nq, T] is [B, Nq, S]
    with the batch folded into the tokens."""
    q, k, v = (randn(3, 50, 4, 64, device=device, dtype=dtype) for _ in range(3))
    out, lse = ops.attention_with_lse(q, k, v)
    cu = cu_seqlens([50, 50, 50], device)
    out_p, lse_p = ops.attention_with_lse(*(t.reshape(150, 4, 64) for t in (q, k, v)), cu_seqlens_q=cu)
    torch.testing.assert_close(out_p.reshape(out.shape), out, rtol=0, atol=0)
    torch.testing.assert_close(lse_p.reshape(4, 3, 50).transpose(0, 1), lse, rtol=0, atol=0)


def _merge(parts):
    """Online-softmax merge of partial (out [T, N, D], lse [N, T]) results over disjoint key blocks (in float64,
    so that only the kernels' own rounding is measured)."""
    lse = torch.logsumexp(torch.stack([p[1].double() for p in parts]), dim=0)
    out = sum(o.double() * torch.exp(part_lse - lse).transpose(0, 1)[..., None] for o, part_lse in parts)
    return out, lse


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_ring_attention_merges_to_full_causal_attention(device, dtype):
    """Causal attention of one query chunk, computed as a ring step would: against each key chunk with global
    offsets, merged by lse. Forward and gradients (which flow through every partial out and lse) must match one
    full causal attention."""
    seq, chunk, heads_q, heads_kv, dim = 192, 64, 4, 2, 64
    q_all = randn(seq, heads_q, dim, device=device, dtype=dtype)
    k_all, v_all = (randn(seq, heads_kv, dim, device=device, dtype=dtype) for _ in range(2))
    whole = cu_seqlens([seq], device)
    q_chunk = slice(chunk, 2 * chunk)  # this rank's queries: positions [64, 128)

    def ring(q, k, v):
        parts = []
        for start in range(0, seq, chunk):  # every key chunk; the one after the queries is all masked
            keys = slice(start, start + chunk)
            parts.append(
                ops.attention_with_lse(
                    q, k[keys], v[keys], True, q_offset=chunk, k_offset=start, cu_seqlens_q=cu_seqlens([chunk], device)
                )
            )
        return _merge(parts)

    def full(q, k, v):
        q_padded = torch.cat([q.new_zeros(chunk, heads_q, dim), q, q.new_zeros(seq - 2 * chunk, heads_q, dim)])
        out, lse = ref.attention_with_lse(q_padded, k, v, True, cu_seqlens_q=whole)
        return out[q_chunk], lse[:, q_chunk]

    compare(ring, full, [q_all[q_chunk], k_all, v_all], [0, 1, 2])


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_rows_that_see_no_key(device, dtype):
    """Keys that start after every query: zero output, lse = -inf, zero gradients, nothing NaN."""
    q = randn(1, 8, 2, 64, device=device, dtype=dtype).requires_grad_()
    k, v = (randn(1, 8, 2, 64, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    out, lse = ops.attention_with_lse(q, k, v, True, q_offset=0, k_offset=8)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, -math.inf))
    (out.float().sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


@pytest.mark.parametrize(("device", "dtype"), CASES[:1] + CASES[2:3])
def test_lse_is_the_log_sum_exp_of_the_scores(device, dtype):
    q, k = (randn(1, 20, 2, 64, device=device, dtype=dtype) for _ in range(2))
    _, lse = ops.attention_with_lse(q, k, randn(1, 20, 2, 64, device=device, dtype=dtype), True, 0.3)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.3
    scores = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool, device=device).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    compare(ops.attention, ref.attention, [q, k, randn(1, 20, 2, 64, device=device, dtype=dtype)], [0, 1, 2], True, 0.3)


def test_dense_conventions_match_torch_flash_attention_on_cpu():
    """Out, lse layout [B, Nq, Sq] and the top-left causal mask for Sq != Sk agree with torch's own CPU flash
    attention (which returns its log-sum-exp too)."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None:
        pytest.skip("this torch has no _scaled_dot_product_flash_attention_for_cpu")
    q, k, v = torch.randn(2, 4, 37, 64), torch.randn(2, 4, 50, 64), torch.randn(2, 4, 50, 64)
    out, lse = flash(q, k, v, is_causal=True)
    ours, ours_lse = ops.attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True)
    torch.testing.assert_close(ours_lse, lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, out.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_existing_attention_is_the_out_of_attention_with_lse(device, dtype):
    q, k, v = (randn(2, 40, 2, 64, device=device, dtype=dtype) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, True), ops.attention_with_lse(q, k, v, True)[0], rtol=0, atol=0)
    compare(ops.attention, ref.attention, [q, k, v], [0, 1, 2], True, None)


@pytest.mark.parametrize(("device", "dtype"), CASES[2:])
def test_cuda_training_shape_and_determinism(device, dtype):
    """A llama-like shape (GQA 8:2, D 128, 1k causal tokens, two packed sequences) on the GPU; the backward
    pass uses no atomics, so two runs give identical gradients."""
    lengths = [700, 324]
    q, k, v, cu, _ = _packed(lengths, lengths, 8, 2, 128, device, dtype)
    kwargs = {"cu_seqlens_q": cu, "max_seqlen_q": 700, "max_seqlen_k": 700}
    compare(
        _with_kwargs(ops.attention_with_lse, **kwargs), _with_kwargs(ref.attention_with_lse, cu_seqlens_q=cu),
        [q, k, v], [0, 1, 2], True, None,
    )  # fmt: skip
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = ops.attention_with_lse(*leaves, True, **kwargs)
        torch.autograd.backward([out, lse], [torch.ones_like(out), torch.ones_like(lse)])
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b), "attention backward is not deterministic"


@pytest.mark.cuda
def test_cuda_unaligned_inputs_are_copied():
    """A tensor view starting off a 16-byte boundary still works (it is copied before the cp.async kernels)."""
    base = randn(1 * 64 * 2 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q = base[1:].view(1, 64, 2, 64)
    assert q.data_ptr() % 16 != 0
    k, v = (randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = ops.attention_with_lse(q, k, v)
    expected, expected_lse = ref.attention_with_lse(q.double(), k.double(), v.double())
    assert_within_rule("out", out, expected, ref.attention_with_lse(q, k, v)[0])
    assert_within_rule("lse", lse, expected_lse, ref.attention_with_lse(q, k, v)[1])


def test_bad_inputs_name_the_argument():
    q, k = torch.randn(6, 2, 16), torch.randn(6, 1, 16)
    cu = torch.tensor([0, 1, 6], dtype=torch.int32)

    def call(**kwargs):
        return ops.attention_with_lse(kwargs.pop("q", q), kwargs.pop("k", k), kwargs.pop("v", k), **kwargs)

    with pytest.raises(
        ValueError, match=r"cu_seqlens_q must be a 1-D int32 tensor \[num_seqs \+ 1\], got torch\.int64"
    ):
        call(cu_seqlens_q=cu.long())
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[0\] must be 0, got 1"):
        call(cu_seqlens_q=torch.tensor([1, 2, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing, got 4 then 3 at index 2"):
        call(cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 4, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] must be the number of tokens \(6\), got 5"):
        call(cu_seqlens_q=torch.tensor([0, 1, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sequence 1 has 5 tokens \(cu_seqlens_q\) but max_seqlen_q is 3"):
        call(cu_seqlens_q=cu, max_seqlen_q=3, max_seqlen_k=5)  # checked by the compiled module on CPU
    with pytest.raises(ValueError, match="cu_seqlens_k has 2 entries but cu_seqlens_q has 3"):
        call(cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k was given without cu_seqlens_q"):
        call(cu_seqlens_k=cu)
    with pytest.raises(ValueError, match=r"with cu_seqlens, q must be packed \[tokens, heads_q, head_dim\]"):
        call(q=q[None], cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="max_seqlen_q/max_seqlen_k only apply to packed inputs"):
        call(q=q[None], k=k[None], v=k[None], max_seqlen_q=6)
    with pytest.raises(ValueError, match=r"max_seqlen_k must be a non-negative int, got -1"):
        call(cu_seqlens_q=cu, max_seqlen_k=-1)
    with pytest.raises(ValueError, match=r"q_offset must be an int, got 1\.5"):
        call(q=q[None], k=k[None], v=k[None], q_offset=1.5)
    with pytest.raises(ValueError, match=r"k must be \[batch=1, seq_k, heads_kv, head_dim=16\], got \(2, 6, 1, 16\)"):
        call(q=q[None], k=torch.randn(2, 6, 1, 16), v=torch.randn(2, 6, 1, 16))
    with pytest.raises(ValueError, match=r"the number of k/v heads \(3\) must divide the number of q heads \(2\)"):
        call(k=torch.randn(6, 3, 16), v=torch.randn(6, 3, 16), cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="cu_seqlens_q must be on the device of q"):
        call(cu_seqlens_q=cu.to("meta"))


def test_compiled_varlen_matches_eager():
    """torch.compile(fullgraph=True) through the op, its fake implementation and its backward (max_seqlen given,
    so nothing reads cu_seqlens on the host)."""
    q, k, v, cu, _ = _packed([3, 17, 1, 9], [3, 17, 1, 9], 4, 2, 16, "cpu", torch.float32)

    def loss(q, k, v):
        out, lse = ops.attention_with_lse(q, k, v, True, cu_seqlens_q=cu, max_seqlen_q=17, max_seqlen_k=17, q_offset=2)
        return (out * out).sum() + lse.sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = loss(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, leaves), eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_gradcheck_float32_varlen_with_offsets():
    """Finite differences of the kernel's own forward (out and lse) against its backward, in float32."""
    q, k, v, cu_q, cu_k = _packed([2, 5], [4, 6], 2, 1, 8, "cpu", torch.float32)

    def fn(q, k, v):
        return ops.attention_with_lse(q, k, v, True, 0.7, q_offset=3, k_offset=1, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    with pytest.warns(UserWarning):  # gradcheck warns about non-double inputs
        assert torch.autograd.gradcheck(fn, inputs, eps=2e-3, atol=2e-3, rtol=2e-2, fast_mode=False)


def test_cpu_varlen_memory_does_not_grow_with_seq_squared():
    """One 8k-token sequence packed with short ones, forward and backward: an 8k x 8k float32 score matrix would
    be 256 MiB; the tiled kernels must stay far below that (peak RSS growth of a fresh process)."""
    code = (
        "import resource, torch\n"
        "from megalith.kernels import ops\n"
        "lengths = [5, 8192, 1, 300]\n"
        "cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)\n"
        "q, k, v = (torch.randn(sum(lengths), 1, 16, requires_grad=True) for _ in range(3))\n"
        "small = torch.tensor([0, 64], dtype=torch.int32)\n"
        "ops.attention_with_lse(q[:64].detach(), k[:64].detach(), v[:64].detach(), cu_seqlens_q=small)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out, lse = ops.attention_with_lse(q, k, v, True, cu_seqlens_q=cu)\n"
        "(out.sum() + lse.sum()).backward()\n"
        "assert torch.isfinite(q.grad).all()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    grown_mib = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert grown_mib < 64, f"peak memory grew by {grown_mib} MiB during an 8k-token varlen attention"
