"""attention_with_lse_backward: the gradients of one key block of a merged (ring) attention, from the merged out
and lse, summed over the blocks, equal the gradients of the whole attention (kernel and plain-PyTorch reference,
dense with offsets and packed with documents that span blocks), and bad inputs are refused by name."""

from __future__ import annotations

import pytest
import torch

from megalith.kernels import ops
from megalith.kernels import reference as ref


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _blockwise_grads(backward, q, k, v, out, grad, lse, blocks, **kwargs):
    """dq summed over key blocks, dk/dv assembled from each block's share."""
    dq = torch.zeros_like(q, dtype=torch.float64)
    dk, dv = torch.zeros_like(k, dtype=torch.float64), torch.zeros_like(v, dtype=torch.float64)
    for keys, block_kwargs in blocks:
        gq, gk, gv = backward(q, k[keys], v[keys], out, grad, lse, **kwargs, **block_kwargs)
        dq += gq.double()
        dk[keys] += gk.double()
        dv[keys] += gv.double()
    return dq, dk, dv


@pytest.mark.parametrize("backward", [ops.attention_with_lse_backward, ref.attention_with_lse_backward])
def test_dense_blocks_with_offsets_sum_to_the_whole_gradient(backward):
    """Queries [32, 64) against keys [0, 64) cut in two blocks: one entirely visible, one causal (offsets)."""
    torch.manual_seed(0)
    seq, chunk = 64, 32
    q = torch.randn(2, chunk, 4, 16, requires_grad=True)
    k, v = (torch.randn(2, seq, 2, 16, requires_grad=True) for _ in range(2))
    out, lse = ops.attention_with_lse(q, k, v, True, q_offset=chunk)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), grad)
    blocks = [
        ((slice(None), slice(0, chunk)), dict(causal=False)),
        ((slice(None), slice(chunk, seq)), dict(causal=True, q_offset=chunk, k_offset=chunk)),
    ]
    got = _blockwise_grads(backward, q.detach(), k.detach(), v.detach(), out.detach(), grad, lse.detach(), blocks)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backward", [ops.attention_with_lse_backward, ref.attention_with_lse_backward])
def test_packed_documents_split_over_key_blocks(backward):
    """Two documents (lengths 20 and 28) packed; the keys cut in two blocks at 24, inside the second document."""
    torch.manual_seed(1)
    lengths = [20, 28]
    total = sum(lengths)
    q = torch.randn(total, 4, 8, requires_grad=True)
    k, v = (torch.randn(total, 4, 8, requires_grad=True) for _ in range(2))
    out, lse = ops.attention_with_lse(q, k, v, True, cu_seqlens_q=_cu(lengths))
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), grad)
    # Keys [0, 24) hold document 0 and the first 4 keys of document 1; keys [24, 48) the rest of document 1.
    blocks = [
        (slice(0, 24), dict(causal=True, cu_seqlens_q=_cu(lengths), cu_seqlens_k=_cu([20, 4]))),
        (slice(24, 48), dict(causal=True, cu_seqlens_q=_cu([20, 28]), cu_seqlens_k=_cu([0, 24]), k_offset=4)),
    ]
    got = _blockwise_grads(backward, q.detach(), k.detach(), v.detach(), out.detach(), grad, lse.detach(), blocks)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.double(), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named():
    q = torch.randn(1, 8, 2, 16)
    k = v = torch.randn(1, 8, 2, 16)
    out, lse = ops.attention_with_lse(q, k, v)
    with pytest.raises(ValueError, match=r"grad_out must have the shape of q"):
        ops.attention_with_lse_backward(q, k, v, out, out[:, :4], lse)
    with pytest.raises(ValueError, match=r"lse must be float32 \(1, 2, 8\)"):
        ops.attention_with_lse_backward(q, k, v, out, out, lse.double())
