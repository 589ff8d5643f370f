"""The fp8 matmul `(a_q / s_a) @ (b_q / s_b)^T` on `torch._scaled_mm`, or its emulation where that is missing.

Operands are 2-D with the contraction on the last dimension: `a` is [M, K], `b` is [N, K], the result
[M, N]. Scales are 0-d (tensorwise) or one per row ([M, 1] and [N, 1]: rowwise).

`torch._scaled_mm` takes the inverse scales, a row-major `a` and a column-major `b`, and (on CUDA) every
dimension a multiple of 16: other sizes are zero-padded here, which changes no sum, and the result is cut back.

The emulation multiplies the same fp8 values, upcast to fp32, with an fp32 matmul, then applies the inverse
scales, so it sees exactly the operands `_scaled_mm` would. The two differ only in accumulation: products of
two fp8 values are exact in fp32, and the emulation (like `_scaled_mm` on the CPU) sums them in fp32 in the
order of the BLAS it runs on; Hopper's fp8 tensor cores sum in a narrower accumulator (about 22 bits) that is
flushed to fp32 periodically, more so with `use_fast_accum`, which the forward matmul uses (as torchao does).
"""

from __future__ import annotations

import functools
import warnings

import torch

from megalith.core import _torch_compat

__all__ = ["emulated_mm", "fp8_mm", "padded_scaled_mm", "scaled_mm_unsupported"]

_MULTIPLE = 16


def emulated_mm(a_q, a_scale, b_q, b_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """The fp8 matmul emulated: fp32 matmul of the upcast fp8 operands, then the inverse scales."""
    acc = a_q.float() @ b_q.float().t()
    return (acc * a_scale.reciprocal() * b_scale.reciprocal().t()).to(out_dtype)


def _pad(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    out = torch.full((rows, cols), value, dtype=torch.float32, device=t.device).to(t.dtype)
    out[: t.shape[0], : t.shape[1]].copy_(t)
    return out


def _up(n: int) -> int:
    return -(-n // _MULTIPLE) * _MULTIPLE


def padded_scaled_mm(a_q, a_scale, b_q, b_scale, out_dtype: torch.dtype, *, fast_accum: bool = False):
    """The fp8 matmul on `torch._scaled_mm`, every dimension zero-padded to a multiple of 16."""
    (m, k), n = a_q.shape, b_q.shape[0]
    mp, kp, np_ = _up(m), _up(k), _up(n)
    a = _pad(a_q, mp, kp).contiguous()
    b = _pad(b_q, np_, kp).contiguous()
    inv_a, inv_b = a_scale.reciprocal(), b_scale.reciprocal()
    if inv_a.dim():  # rowwise: padding rows get scale 1 (their products are zero anyway)
        inv_a, inv_b = _pad(inv_a, mp, 1, 1.0), _pad(inv_b, np_, 1, 1.0).t()
    out = _torch_compat.scaled_mm(a, b.t(), inv_a, inv_b, out_dtype, use_fast_accum=fast_accum)
    return out[:m, :n] if (mp, np_) != (m, n) else out


@functools.cache
def scaled_mm_unsupported(device: torch.device, a_dtype, b_dtype, rowwise: bool, out_dtype) -> str | None:
    """Why `torch._scaled_mm` cannot run this combination here (None when it can): tried once on tiny inputs."""
    if not _torch_compat.has_scaled_mm():
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"sm_{major}{minor} has no fp8 tensor cores (sm_89 or newer)"
    try:
        a = torch.ones(_MULTIPLE, _MULTIPLE, device=device).to(a_dtype)
        b = torch.ones(_MULTIPLE, _MULTIPLE, device=device).to(b_dtype)
        shape = (_MULTIPLE, 1) if rowwise else ()
        scale = torch.ones(shape, device=device)
        out = padded_scaled_mm(a, scale, b, scale, out_dtype)
        if not bool((out.float() == _MULTIPLE).all()):
            return "torch._scaled_mm returned wrong values on a probe"
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        return f"torch._scaled_mm failed on a probe: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def auto_tries_scaled_mm(device: torch.device) -> bool:
    """Whether matmul='auto' uses `_scaled_mm` on this device (where it runs): on accelerators, not on the CPU,
    where torch's `_scaled_mm` is a reference path far slower than the emulation's fp32 matmul."""
    return device.type != "cpu"


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def fp8_mm(a_q, a_scale, b_q, b_scale, out_dtype: torch.dtype, *, mode: str, layer: str, fast_accum: bool = False):
    """`(a_q / a_scale) @ (b_q / b_scale)^T` in `out_dtype`.

    Args:
        mode: 'auto' (`_scaled_mm` on an accelerator where it runs, else the emulation with a one-line warning;
            on the CPU always the emulation, silently: torch's CPU `_scaled_mm` is a slow reference path, about
            200x an fp32 matmul for e4m3 x e4m3 at 512^3 on torch 2.11 and 2.13), 'scaled_mm' (`_scaled_mm`, an
            error where it does not run) or 'emulated'.
        layer: the layer's name, for the warning and the error.
        fast_accum: let `_scaled_mm` use the faster, less precise accumulation (Hopper).
    """
    if mode == "scaled_mm" or (mode == "auto" and auto_tries_scaled_mm(a_q.device)):
        reason = scaled_mm_unsupported(a_q.device, a_q.dtype, b_q.dtype, a_scale.dim() > 0, out_dtype)
        if reason is None:
            return padded_scaled_mm(a_q, a_scale, b_q, b_scale, out_dtype, fast_accum=fast_accum)
        what = f"{_dtype_name(a_q.dtype)} x {_dtype_name(b_q.dtype)}{' rowwise' if a_scale.dim() else ''}"
        if mode == "scaled_mm":
            raise RuntimeError(
                f"fp8 layer {layer}: {reason} ({what} on {a_q.device.type}); fp8.matmul=scaled_mm forbids the "
                f"emulation (use fp8.matmul=auto or emulated)"
            )
        _warn_once(f"fp8: {reason} ({what} on {a_q.device.type}); emulating it (fp32 matmul of fp8 operands)")
    return emulated_mm(a_q, a_scale, b_q, b_scale, out_dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.float8_")
