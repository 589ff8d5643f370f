"""Megalith's grouped GEMM: torch's private `torch._grouped_mm` where it runs, else a loop with the same numbers.

`torch._grouped_mm(x [N, K], w [G, K, M], offs=[G] int32 cumulative row ends)` multiplies row group g of x by
w[g] in one kernel (CUTLASS on Hopper GPUs, a CPU implementation too). It is a private API: its name, signature
or support can change with any torch release, so it is called through `megalith.core._torch_compat.grouped_mm`
only, and `tests/core/moe/test_grouped_gemm.py` checks the exact call, failing loudly when torch changes it.
`grouped_mm` falls back to one matmul per group (`looped_mm`, the same numbers) wherever the private op is
missing or cannot take the operands (device, dtype, 16-byte aligned strides).

Shape legend: N rows (tokens sorted by expert), K input features, M output features, G groups (experts).
"""

from __future__ import annotations

import torch

from megalith.core import _torch_compat

__all__ = ["GEMM_CHOICES", "grouped_mm", "grouped_mm_available", "looped_mm"]

GEMM_CHOICES = ("auto", "grouped_mm", "loop")
_ALIGN_BYTES = 16


def grouped_mm_available(x_NK: torch.Tensor, w_GKM: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` exists and takes these operands (device, dtype and stride alignment)."""
    if not _torch_compat.has_grouped_mm():
        return False
    if x_NK.dtype != w_GKM.dtype or x_NK.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x_NK.device.type == "cuda":
        # The CUTLASS kernel is built for Hopper (sm90) and newer, bf16 only.
        if x_NK.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_NK.device)[0] < 9:
            return False
    elif x_NK.device.type != "cpu":
        return False
    size = x_NK.element_size()
    return all((n * size) % _ALIGN_BYTES == 0 for n in (x_NK.shape[1], w_GKM.shape[1], w_GKM.shape[2]))


class _ContiguousGrad(torch.autograd.Function):
    """Forward: identity. Backward: the gradient made contiguous (the grouped GEMM's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _offsets(counts_G: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts_G, 0).to(torch.int32)


def looped_mm(x_NK: torch.Tensor, w_GKM: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """Row group g of `x_NK` (counts_G[g] rows, in order) times w_GKM[g], one matmul per group: [N, M]."""
    parts = torch.split(x_NK, counts_G.tolist(), dim=0)
    return torch.cat([part @ w_GKM[g] for g, part in enumerate(parts)], dim=0)


def grouped_mm(x_NK: torch.Tensor, w_GKM: torch.Tensor, counts_G: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Row group g of `x_NK` times w_GKM[g]: [N, M] (differentiable).

    Args:
        x_NK: rows sorted by group.
        w_GKM: one [K, M] matrix per group (a transposed view of [G, M, K] weights is fine).
        counts_G: rows of each group (int64, summing to N).
        mode: "auto" (the grouped kernel where available, else the loop), "grouped_mm" (the kernel; raises
            when it cannot run) or "loop".
    """
    if mode not in GEMM_CHOICES:
        raise ValueError(f"grouped_mm: mode must be one of {GEMM_CHOICES}, got {mode!r}")
    use_kernel = mode == "grouped_mm" or (mode == "auto" and grouped_mm_available(x_NK, w_GKM))
    if not use_kernel:
        return looped_mm(x_NK, w_GKM, counts_G)
    if not grouped_mm_available(x_NK, w_GKM):
        raise RuntimeError(
            f"torch._grouped_mm cannot run here (torch {torch.__version__}, {x_NK.device.type}, {x_NK.dtype}, "
            f"K={x_NK.shape[1]}, M={w_GKM.shape[2]}); use the 'loop' mode"
        )
    out_NM = _torch_compat.grouped_mm(x_NK.contiguous(), w_GKM, _offsets(counts_G))
    return _ContiguousGrad.apply(out_NM)
