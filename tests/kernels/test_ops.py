"""Every fused op, forward and backward, against a float64 reference (STYLE.md tolerance rule).

The same tests run on CPU (float32, bfloat16) and, marked `cuda`, on a GPU (float32, float16, bfloat16).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from megalith.kernels import ops
from megalith.kernels import reference as ref
from tests.kernels.reference_check import compare

CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.cuda),
]


def randn(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 128), (1, 1000)])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_rms_norm(device, dtype, shape, zero_centered):
    x = randn(*shape, device=device, dtype=dtype)
    w = randn(shape[-1], device=device, dtype=dtype, scale=0.5)
    compare(ops.rms_norm, ref.rms_norm, [x, w], [0, 1], 1e-5, zero_centered)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 128), (1, 1000)])
@pytest.mark.parametrize(("with_bias", "zero_centered"), [(True, False), (False, True)])
def test_layer_norm(device, dtype, shape, with_bias, zero_centered):
    x = randn(*shape, device=device, dtype=dtype) + 0.5
    w = randn(shape[-1], device=device, dtype=dtype, scale=0.5)
    if with_bias:
        b = randn(shape[-1], device=device, dtype=dtype)
        compare(ops.layer_norm, ref.layer_norm, [x, w, b], [0, 1, 2], 1e-5, zero_centered)
    else:
        compare(
            lambda x, w, eps, zc: ops.layer_norm(x, w, None, eps, zc),
            lambda x, w, eps, zc: ref.layer_norm(x, w, None, eps, zc),
            [x, w],
            [0, 1],
            1e-5,
            zero_centered,
        )


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("shape", "causal"), [((2, 3, 7, 7), True), ((1, 2, 5, 13), True), ((2, 2, 9, 33), False)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_scaled_softmax(device, dtype, shape, causal, with_mask):
    x = randn(*shape, device=device, dtype=dtype, scale=2.0)
    mask = None
    if with_mask:
        # Padding mask over keys, broadcast over heads and queries; batch 0 hides every key of the first
        # query rows only through causality + padding, batch -1 hides all keys (rows must come out zero).
        mask = torch.rand(shape[0], 1, 1, shape[3], device=device) < 0.3
        mask[-1] = True
    compare(
        lambda x, m, s, c: ops.scaled_softmax(x, s, c, m),
        lambda x, m, s, c: ref.scaled_softmax(x, s, c, m),
        [x, mask] if mask is not None else [x],
        [0],
        *(() if mask is not None else (None,)),
        0.7,
        causal,
    )
    if with_mask:
        out = ops.scaled_softmax(x, 0.7, causal, mask)
        assert torch.equal(out[-1], torch.zeros_like(out[-1])), "fully masked rows must be zeros"


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("shape", "rot"), [((2, 7, 3, 64), 64), ((1, 13, 2, 40), 24), ((2, 5, 1, 128), 128)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope(device, dtype, shape, rot, interleaved):
    x = randn(*shape, device=device, dtype=dtype)
    positions = torch.arange(shape[1], dtype=torch.float64)[:, None]
    freqs = 10000.0 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = positions * freqs
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    compare(
        lambda x, i: ops.rope(x, cos, sin, i),
        lambda x, i: ref.rope(x, cos.to(x.dtype), sin.to(x.dtype), i),
        [x],
        [0],
        interleaved,
    )


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 4, 256), (5000,)])
def test_swiglu(device, dtype, shape):
    gate = randn(*shape, device=device, dtype=dtype, scale=2.0)
    up = randn(*shape, device=device, dtype=dtype)
    compare(ops.swiglu, ref.swiglu, [gate, up], [0, 1])


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 4, 256)])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(device, dtype, shape, approximate, with_bias):
    x = randn(*shape, device=device, dtype=dtype, scale=2.0)
    if with_bias:
        b = randn(shape[-1], device=device, dtype=dtype)
        compare(ops.bias_gelu, ref.bias_gelu, [x, b], [0, 1], approximate)
    else:
        compare(lambda x, a: ops.bias_gelu(x, None, a), lambda x, a: ref.bias_gelu(x, None, a), [x], [0], approximate)


def _targets(rows_shape, vocab, device):
    target = torch.randint(0, vocab, rows_shape, device=device)
    target.view(-1)[::5] = -100  # every fifth token is ignored
    return target


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(("rows_shape", "vocab"), [((7,), 11), ((2, 9), 1000), ((3,), 5003)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy(device, dtype, rows_shape, vocab, label_smoothing):
    logits = randn(*rows_shape, vocab, device=device, dtype=dtype, scale=3.0)
    target = _targets(rows_shape, vocab, device)

    def reference(logits, target, ignore, smoothing):
        return ref.cross_entropy(logits, target, ignore, smoothing).to(
            torch.float64 if logits.dtype == torch.float64 else torch.float32
        )

    compare(ops.cross_entropy, reference, [logits, target], [0], -100, label_smoothing)
    loss = ops.cross_entropy(logits, target, -100, label_smoothing)
    assert loss.dtype == torch.float32
    assert torch.all(loss[target == -100] == 0)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_vocab_parallel_pieces_combine_to_the_full_loss(device, dtype, label_smoothing):
    """Three uneven vocabulary shards, combined as the ranks of a vocab-parallel loss would."""
    rows, vocab, bounds = 13, 301, [0, 90, 200, 301]
    logits = randn(rows, vocab, device=device, dtype=dtype, scale=3.0)
    target = _targets((rows,), vocab, device)
    shards = [logits[:, a:b] for a, b in itertools.pairwise(bounds)]
    parts = [ops.cross_entropy_partials(s, target, a) for s, a in zip(shards, bounds, strict=False)]
    local_max = torch.stack([p[0] for p in parts])
    global_max = local_max.max(0).values
    lse = global_max + torch.log(sum(p[1] * torch.exp(m - global_max) for p, m in zip(parts, local_max, strict=True)))
    target_logit = sum(p[2] for p in parts)
    mean_logit = sum(p[3] for p in parts) / vocab
    eps = label_smoothing
    loss = ((1 - eps) * (lse - target_logit) + eps * (lse - mean_logit)) * (target != -100)

    logits64 = logits.double().requires_grad_()
    expected = ref.cross_entropy(logits64, target, -100, eps)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tol, atol=tol)

    grad_loss = torch.rand(rows, dtype=torch.float64, device=device)
    expected.backward(grad_loss)
    grads = [
        ops.cross_entropy_grad(s, target, lse, grad_loss.float(), a, vocab, -100, eps)
        for s, a in zip(shards, bounds, strict=False)
    ]
    torch.testing.assert_close(torch.cat(grads, dim=1).double(), logits64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize(("device", "dtype"), CASES)
@pytest.mark.parametrize(
    ("batch", "seq", "heads_q", "heads_kv", "dim"),
    [(2, 70, 4, 2, 64), (1, 130, 2, 1, 128), (1, 33, 3, 3, 64), (2, 5, 4, 1, 16)],
)
@pytest.mark.parametrize("causal", [True, False])
def test_attention(device, dtype, batch, seq, heads_q, heads_kv, dim, causal):
    if device == "cuda" and dim not in (64, 128):
        pytest.skip("CUDA kernels are built for head_dim 64 and 128")
    q = randn(batch, seq, heads_q, dim, device=device, dtype=dtype)
    k = randn(batch, seq, heads_kv, dim, device=device, dtype=dtype)
    v = randn(batch, seq, heads_kv, dim, device=device, dtype=dtype)
    compare(ops.attention, ref.attention, [q, k, v], [0, 1, 2], causal, None)
