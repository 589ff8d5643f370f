"""torch's private grouped GEMM as `megalith.core.moe.grouped_gemm` calls it, and the fallback it must equal.

`test_torch_private_grouped_mm_contract` is the loud alarm for a torch upgrade: it makes exactly the call the
module makes (name, positional and keyword arguments, operand layouts) and checks the numbers. It does not skip:
if torch drops or changes `_grouped_mm`, it fails and names the module to update.
"""

from __future__ import annotations

import pytest
import torch

from megalith.core.moe.grouped_gemm import grouped_mm, grouped_mm_available, looped_mm

_FIX = "update megalith/core/_torch_compat.py (grouped_mm, the only call) for this torch"


def _operands(dtype, counts, k=16, m=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=gen).to(dtype)
    w = torch.randn(len(counts), m, k, generator=gen).to(dtype)  # stored [G, out, in], used transposed
    return x, w, torch.tensor(counts)


def _per_group(x, w, counts):
    out, start = [], 0
    for g, n in enumerate(counts.tolist()):
        out.append(x[start : start + n].float() @ w[g].float().t())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_private_grouped_mm_contract(dtype):
    assert hasattr(torch, "_grouped_mm"), f"torch {torch.__version__} has no torch._grouped_mm; {_FIX}"
    x, w, counts = _operands(dtype, [3, 0, 5, 4])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    try:
        out = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    except (TypeError, RuntimeError) as exc:
        pytest.fail(f"torch {torch.__version__} changed torch._grouped_mm(x, w, offs=...): {exc}; {_FIX}")
    assert out.shape == (12, 8) and out.dtype == dtype, f"torch._grouped_mm returned {out.shape} {out.dtype}; {_FIX}"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), _per_group(x, w, counts), rtol=tol, atol=tol)
    assert grouped_mm_available(x, w.transpose(1, 2))


@pytest.mark.parametrize("counts", [[3, 0, 5, 4], [0, 0, 6, 6], [7, 5, 0, 0], [0, 0, 0, 0]])
def test_grouped_mm_equals_the_loop_forward_and_backward(counts):
    x, w, c = _operands(torch.float32, counts, seed=len(counts) + sum(counts))
    grad = torch.randn(int(c.sum()), 8, generator=torch.Generator().manual_seed(9))
    results = {}
    for mode in ("grouped_mm", "loop", "auto"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = grouped_mm(xx, ww.transpose(1, 2), c, mode)
        out.backward(grad)
        results[mode] = (out.detach(), xx.grad, ww.grad)
    for mode in ("loop", "auto"):
        for got, want in zip(results[mode], results["grouped_mm"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results["loop"][0], _per_group(x, w, c), rtol=1e-6, atol=1e-6)


def test_misaligned_operands_fall_back_or_refuse():
    x, w, counts = _operands(torch.float32, [2, 3], k=6, m=5)  # 24- and 20-byte rows: not 16-byte aligned
    assert not grouped_mm_available(x, w.transpose(1, 2))
    torch.testing.assert_close(grouped_mm(x, w.transpose(1, 2), counts), looped_mm(x, w.transpose(1, 2), counts))
    with pytest.raises(RuntimeError, match=r"torch._grouped_mm cannot run here .* use the 'loop' mode"):
        grouped_mm(x, w.transpose(1, 2), counts, "grouped_mm")
    with pytest.raises(ValueError, match="mode must be one of"):
        grouped_mm(x, w.transpose(1, 2), counts, "fast")
