"""Megalith's fused kernels as torch operators (torch.library: schema, CPU/CUDA kernel, autograd, fake).

Each public function works eagerly, under autograd and inside ``torch.compile(fullgraph=True)``. Tensors are
handed to the torch-free compiled module (`megalith.kernels._C.kernels`) as (pointer, dtype, shape, strides,
device) descriptors, with the current CUDA stream. CPU kernels take float32 and bfloat16, CUDA kernels also
float16; statistics and parameter gradients are accumulated in float32. On CUDA tensors, when the module was
built without CUDA, every op computes `megalith.kernels.reference` instead.
Shapes: B batch, S sequence, N heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import torch

from megalith.kernels import reference as ref
from megalith.kernels._attention import attention, attention_with_lse, attention_with_lse_backward
from megalith.kernels._dispatch import (
    _K,
    _check_float,
    _desc,
    _empty_rows,
    _inner_dense,
    _rows,
    _stream,
    _torch_uses_openmp,
    _use_reference,
    fused_op,
)
from megalith.kernels._loss_attention import cross_entropy, cross_entropy_grad, cross_entropy_partials

__all__ = [
    "attention",
    "attention_with_lse",
    "attention_with_lse_backward",
    "bias_gelu",
    "cpu_isa",
    "cpu_threading",
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_partials",
    "layer_norm",
    "rms_norm",
    "rope",
    "scaled_softmax",
    "set_cpu_isa",
    "set_num_threads",
    "swiglu",
]


def set_num_threads(num_threads: int | None) -> None:
    """Fixes how many threads the CPU kernels use; None (the default) follows torch's intra-op thread count.

    The kernels run their parallel loops on torch's own OpenMP threads when torch uses OpenMP (its usual CPU
    builds), so they never compete with torch's threads for cores; otherwise on threads of their own.
    """
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)):
        raise ValueError(f"num_threads must be an int >= 1 or None, got {num_threads!r}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 (or None to follow torch's intra-op threads), got {num_threads}")
    _K.set_num_threads(0 if num_threads is None else num_threads)


def cpu_threading() -> tuple[str, int]:
    """How the CPU kernels run in parallel now: ("openmp" (torch's team) or "std::thread", thread count)."""
    return _K.thread_backend(), _K.num_threads()


def cpu_isa() -> str:
    """The instruction set the vectorised CPU kernels run with: "base", "avx2" or "avx512"."""
    return _K.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Forces the CPU kernels' instruction set ("base", "avx2", "avx512"), or "auto" for the best this CPU has.

    The kernels are compiled once per instruction set and the best one is picked at run time; forcing another
    is for comparing them. Raises ValueError for a name that is unknown or that this CPU (or build) lacks.
    """
    _K.set_cpu_isa(str(name))


# Borrow torch's OpenMP team when torch runs on one (see cpp/kernels/cpu/threading.cpp).
_K.use_openmp(_torch_uses_openmp())


# ---- RMSNorm / LayerNorm -------------------------------------------------------------------------------------


@fused_op("megalith::norm_fwd")
def _norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool, zero_centered: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean, rstd = _empty_rows(x), _empty_rows(x)
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    _K.norm_forward(
        _desc(x, "x"), _desc(w, "weight"), _desc(b, "bias"), _desc(out, "out"), _desc(mean, "mean"),
        _desc(rstd, "rstd"), eps, rms, zero_centered, _stream(x),
    )  # fmt: skip
    return out, mean, rstd


@_norm_fwd.register_fake
def _(x, weight, bias, eps, rms, zero_centered):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _empty_rows(x), _empty_rows(x)


@fused_op("megalith::norm_bwd")
def _norm_bwd(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    rms: bool,
    zero_centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, grad, weight = _rows(x), _rows(grad), weight.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
    db = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
    _K.norm_backward(
        _desc(grad, "grad_out"), _desc(x, "x"), _desc(weight, "weight"), _desc(mean, "mean"), _desc(rstd, "rstd"),
        _desc(dx, "grad_x"), _desc(dw, "grad_weight"), _desc(db if has_bias else None, "grad_bias"), rms,
        zero_centered, _stream(x),
    )  # fmt: skip
    return dx, dw.to(weight.dtype), (db if has_bias else torch.zeros_like(db)).to(weight.dtype)


@_norm_bwd.register_fake
def _(grad, x, weight, mean, rstd, has_bias, rms, zero_centered):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight),
        torch.empty_like(weight),
    )


def _norm_setup(ctx, inputs, output):
    x, weight, bias, _, ctx.rms, ctx.zero_centered = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output[1], output[2])


def _norm_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _norm_bwd(grad, x, weight, mean, rstd, ctx.has_bias, ctx.rms, ctx.zero_centered)
    return dx, dw, db if ctx.has_bias else None, None, None, None


_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup)


def _check_norm(x, weight, bias):
    _check_float(x, "x")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.shape != (x.shape[-1],):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) (the last dim of x), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, zero_centered_weight: bool = False):
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight (weight + 1 when zero-centred)."""
    _check_norm(x, weight, None)
    if _use_reference(x):
        return ref.rms_norm(x, weight, eps, zero_centered_weight)
    return _norm_fwd(x, weight, None, float(eps), True, bool(zero_centered_weight))[0]


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    zero_centered_weight: bool = False,
):
    """LayerNorm over the last dimension; the scale is weight + 1 when `zero_centered_weight`."""
    _check_norm(x, weight, bias)
    if _use_reference(x):
        return ref.layer_norm(x, weight, bias, eps, zero_centered_weight)
    return _norm_fwd(x, weight, bias, float(eps), False, bool(zero_centered_weight))[0]


# ---- scaled, masked softmax ----------------------------------------------------------------------------------


@fused_op("megalith::softmax_fwd")
def _softmax_fwd(x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mask = None if mask is None else mask.expand(x.shape)  # stride-0 broadcast, never materialised
    _K.softmax_forward(_desc(x, "x"), _desc(mask, "mask"), _desc(out, "out"), scale, causal, _stream(x))
    return out


@_softmax_fwd.register_fake
def _(x, mask, scale, causal):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@fused_op("megalith::softmax_bwd")
def _softmax_bwd(out: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    out, grad = out.contiguous(), grad.contiguous()
    dx = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    _K.softmax_backward(_desc(out, "out"), _desc(grad, "grad_out"), _desc(dx, "grad_x"), scale, _stream(out))
    return dx


@_softmax_bwd.register_fake
def _(out, grad, scale):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _softmax_setup(ctx, inputs, output):
    ctx.scale = inputs[2]
    ctx.save_for_backward(output)


def _softmax_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return _softmax_bwd(out, grad, ctx.scale), None, None, None


_softmax_fwd.register_autograd(_softmax_backward, setup_context=_softmax_setup)


def scaled_softmax(x: torch.Tensor, scale: float = 1.0, causal: bool = False, mask: torch.Tensor | None = None):
    """softmax(scale * x) over the last dim of [B, N, Sq, Sk] scores, math in float32.

    `causal` hides key j from query i when j > i + Sk - Sq; `mask` (bool, broadcastable to x, True = hidden)
    is a padding mask. Rows with every key hidden give zeros.
    """
    _check_float(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, heads, sq, sk] scores, got shape {tuple(x.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = masked), got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}") from None
        if mask.device != x.device:
            raise ValueError(f"mask must be on the device of x ({x.device}), got {mask.device}")
    if _use_reference(x):
        return ref.scaled_softmax(x, scale, causal, mask)
    return _softmax_fwd(x, mask, float(scale), bool(causal))


# ---- rotary position embedding -------------------------------------------------------------------------------


@fused_op("megalith::rope")
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, inverse: bool) -> torch.Tensor:
    x, cos, sin = _inner_dense(x), cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _K.rope(_desc(x, "x"), _desc(cos, "cos"), _desc(sin, "sin"), _desc(out, "out"), interleaved, inverse, _stream(x))
    return out


@_rope.register_fake
def _(x, cos, sin, interleaved, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_setup(ctx, inputs, output):
    _, cos, sin, ctx.interleaved, ctx.inverse = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    # A rotation's transpose is the rotation by the opposite angle.
    return _rope(grad, cos, sin, ctx.interleaved, not ctx.inverse), None, None, None, None


_rope.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope(x_BSND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False):
    """Rotary embedding of x [B, S, N, D] with cos/sin [S, R/2] (R <= D rotated, the rest passes through).

    Rotate-half pairs (i, i + R/2) (GPT-NeoX / Hugging Face Llama); `interleaved` pairs (2i, 2i + 1).
    cos/sin are used in float32 and receive no gradient.
    """
    _check_float(x_BSND, "x")
    if x_BSND.dim() != 4:
        raise ValueError(f"x must be [batch, seq, heads, head_dim], got shape {tuple(x_BSND.shape)}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != x_BSND.shape[1]:
        raise ValueError(
            f"cos and sin must both be [seq={x_BSND.shape[1]}, rotary_dim/2], got {tuple(cos.shape)} and "
            f"{tuple(sin.shape)}"
        )
    if not 0 < 2 * cos.shape[1] <= x_BSND.shape[-1]:
        raise ValueError(f"rotary width 2*cos.shape[1] = {2 * cos.shape[1]} must be in [2, {x_BSND.shape[-1]}]")
    if _use_reference(x_BSND):
        return ref.rope(x_BSND, cos, sin, interleaved)
    return _rope(x_BSND, cos.float().detach(), sin.float().detach(), bool(interleaved), False)


# ---- SwiGLU and bias-GeLU ------------------------------------------------------------------------------------


@fused_op("megalith::swiglu_fwd")
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _K.swiglu(_desc(gate, "gate"), _desc(up, "up"), None, _desc(out, "out"), None, None, _stream(gate))
    return out


@_swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@fused_op("megalith::swiglu_bwd")
def _swiglu_bwd(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, grad = _rows(gate), _rows(up), _rows(grad)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _K.swiglu(
        _desc(gate, "gate"), _desc(up, "up"), _desc(grad, "grad_out"), None, _desc(dgate, "grad_gate"),
        _desc(dup, "grad_up"), _stream(gate),
    )  # fmt: skip
    return dgate, dup


@_swiglu_bwd.register_fake
def _(gate, up, grad):
    fmt = torch.contiguous_format
    return torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad):
    return _swiglu_bwd(*ctx.saved_tensors, grad)


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor):
    """silu(gate) * up, elementwise."""
    _check_float(gate, "gate")
    if up.dtype != gate.dtype or up.shape != gate.shape or up.device != gate.device:
        raise ValueError(
            f"up must match gate (shape {tuple(gate.shape)}, {gate.dtype}, {gate.device}), got shape "
            f"{tuple(up.shape)}, {up.dtype}, {up.device}"
        )
    if _use_reference(gate):
        return ref.swiglu(gate, up)
    return _swiglu_fwd(gate, up)


@fused_op("megalith::bias_gelu_fwd")
def _bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, tanh: bool) -> torch.Tensor:
    x, bias = _rows(x), None if bias is None else bias.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _K.bias_gelu(_desc(x, "x"), _desc(bias, "bias"), None, _desc(out, "out"), tanh, _stream(x))
    return out


@_bias_gelu_fwd.register_fake
def _(x, bias, tanh):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@fused_op("megalith::bias_gelu_bwd")
def _bias_gelu_bwd(x: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor, tanh: bool) -> torch.Tensor:
    x, bias, grad = _rows(x), None if bias is None else bias.contiguous(), _rows(grad)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _K.bias_gelu(_desc(x, "x"), _desc(bias, "bias"), _desc(grad, "grad_out"), _desc(dx, "grad_x"), tanh, _stream(x))
    return dx


@_bias_gelu_bwd.register_fake
def _(x, bias, grad, tanh):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, ctx.tanh = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _bias_gelu_backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx = _bias_gelu_bwd(x, bias, grad, ctx.tanh)
    # The bias gradient sums dx over every row, accumulated in float32.
    dbias = dx.reshape(-1, dx.shape[-1]).sum(0, dtype=torch.float32).to(dx.dtype) if ctx.has_bias else None
    return dx, dbias, None


_bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "tanh"):
    """gelu(x + bias) with bias [x.shape[-1]] (or none); `approximate` is "tanh" or "none" (exact erf)."""
    _check_float(x, "x")
    if approximate not in ("tanh", "none"):
        raise ValueError(f'approximate must be "tanh" or "none", got {approximate!r}')
    if bias is not None and (bias.shape != (x.shape[-1],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(
            f"bias must be [{x.shape[-1]}] {x.dtype} on {x.device}, got {tuple(bias.shape)} {bias.dtype} {bias.device}"
        )
    if _use_reference(x):
        return ref.bias_gelu(x, bias, approximate)
    return _bias_gelu_fwd(x, bias, approximate == "tanh")
