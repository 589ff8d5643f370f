"""Every private torch API Megalith uses, in one module; tests/core/test_torch_compat.py checks each one.

torch may rename or change anything private in any release. Keeping the uses here means a new torch that breaks one
fails that test with the function's name, and supporting it means editing this file only. Prefer a public API: add
something here only when none does the job, and say why in its docstring.
"""

from __future__ import annotations

import torch

__all__ = ["grouped_mm", "has_grouped_mm", "has_scaled_mm", "is_view", "scaled_mm", "version_counter"]


def is_view(t: torch.Tensor) -> bool:
    """Whether `t` is a view of another tensor (it shares that tensor's storage and autograd version counter).

    torch has no public predicate for this. `Tensor._base` holds the tensor a view was taken from (None for a
    tensor that is not a view); autograd's own view tracking sets it.
    """
    return t._base is not None


def version_counter(t: torch.Tensor) -> int:
    """The autograd version counter of `t`: it grows with every in-place change, so a cached value derived from
    `t` is still valid while the counter is unchanged. Inference tensors have none (check `is_inference()` first).

    torch has no public accessor; `Tensor._version` is the counter autograd itself checks for saved tensors.
    """
    return t._version


def has_grouped_mm() -> bool:
    """Whether this torch has the grouped GEMM `grouped_mm` calls."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Row group g of `x` [N, K] times `w[g]` ([G, K, M]); `offs` [G] int32 are the groups' cumulative row ends.

    torch has no public grouped GEMM; `torch._grouped_mm` is the one its MoE work (torchtitan) uses, with a CPU
    implementation and a CUTLASS kernel for sm90+. Differentiable. Megalith's caller is
    `megalith.core.moe.grouped_gemm`, which falls back to one matmul per group where this cannot run.
    """
    return torch._grouped_mm(x, w, offs=offs)


def has_scaled_mm() -> bool:
    """Whether this torch has the fp8 matmul `scaled_mm` calls."""
    return hasattr(torch, "_scaled_mm")


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype,
              use_fast_accum: bool = False) -> torch.Tensor:  # fmt: skip
    """`(a * scale_a) @ (b * scale_b)` of fp8 operands (a row-major, b column-major; scales are the inverse of
    the cast scales: per tensor, or per row of a and per column of b) in `out_dtype`.

    torch has no public fp8 matmul; `torch._scaled_mm` is the one torchao and Transformer Engine's torch path
    call. Megalith's caller is `megalith.core.fp8.gemm`, which probes each combination once and emulates it where
    this cannot run.
    """
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)
