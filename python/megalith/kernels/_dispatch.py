"""Helpers shared by the op registrations: tensor descriptors for the compiled module, streams, checks."""

from __future__ import annotations

import functools
import itertools

import torch

from megalith.kernels import _C, build_info

_K = _C.kernels
# Codes shared with cpp/bindings/kernel_bindings.cpp.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int64: 3, torch.bool: 4, torch.int32: 5}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)


def _desc(t: torch.Tensor | None, name: str):
    """The descriptor the compiled module reads; raises ValueError naming `name` for unusable tensors.

    It is built on every kernel call, so the common case (a strided cpu or cuda tensor of a known dtype)
    takes the cheapest attribute reads; the binding casts torch.Size and the stride tuple directly.
    """
    if t is None:
        return None
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise ValueError(f"{name} has dtype {t.dtype}, which the fused kernels do not take")
    if t.is_cuda:
        device = t.get_device()
    elif t.is_cpu:
        device = -1
    else:
        raise ValueError(f"{name} is on {t.device}; the fused kernels run on cpu or cuda tensors")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    return (t.data_ptr(), code, t.shape, t.stride(), device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when the kernels can read it in place, else a contiguous copy.

    The CPU kernels read rows spaced by one stride with a dense last dimension (the halves of a fused
    projection, a slice of a padded vocabulary), which needs the leading dimensions to merge into one; the
    CUDA kernels read contiguous tensors only.
    """
    if t.is_contiguous():
        return t
    if t.is_cpu and t.dim() > 0:
        dims = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True) if size != 1]
        inner_ok = t.shape[-1] == 1 or t.stride(-1) == 1
        merges = all(outer[1] == inner[1] * inner[0] for outer, inner in itertools.pairwise(dims))
        if inner_ok and merges and (not dims or dims[-1][1] >= 1):
            return t
    return t.contiguous()


def _inner_dense(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when the CPU kernels can read it in place (positive strides, dense last dim), else a copy."""
    if t.is_contiguous():
        return t
    if t.is_cpu and t.dim() > 0:
        inner_ok = t.shape[-1] == 1 or t.stride(-1) == 1
        if inner_ok and all(stride >= 1 or size == 1 for size, stride in zip(t.shape, t.stride(), strict=True)):
            return t
    return t.contiguous()


def _torch_uses_openmp() -> bool:
    """Whether torch's intra-op threads are an OpenMP team (its usual CPU builds)."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


@functools.cache
def _cuda_compiled() -> bool:
    return bool(build_info()["cuda"])


def _use_reference(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and not _cuda_compiled()


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type == "cpu" and t.dtype == torch.float16:
        raise ValueError(f"{name}: the CPU kernels take float32 or bfloat16, got float16")


def _empty_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
