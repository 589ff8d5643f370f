"""Helpers shared by the op registrations: tensor descriptors for the compiled module, streams, checks."""

from __future__ import annotations

import functools

import torch

from megalith.kernels import _C, build_info

_K = _C.kernels
# Codes shared with cpp/bindings/kernel_bindings.cpp.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int64: 3, torch.bool: 4, torch.int32: 5}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)


def _desc(t: torch.Tensor | None, name: str):
    """The descriptor the compiled module reads; raises ValueError naming `name` for unusable tensors."""
    if t is None:
        return None
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name} has dtype {t.dtype}, which the fused kernels do not take")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {t.device}; the fused kernels run on cpu or cuda tensors")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], list(t.shape), list(t.stride()), t.device.index if t.is_cuda else -1)


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
