"""FlashAttention-style attention as torch operators: dense or packed (varlen), returning the log-sum-exp too.

Re-exported by `megalith.kernels.ops`. Shapes: B batch, Sq/Sk query/key sequence, T packed tokens (Tq/Tk),
Nq/Nkv query/key-value heads, D head dim.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch

from megalith.kernels import reference as ref
from megalith.kernels._dispatch import _CUDA_HEAD_DIMS, _K, _check_float, _desc, _stream, _use_reference, fused_op


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _ready(t: torch.Tensor | None) -> torch.Tensor | None:
    """Contiguous, and on CUDA starting on a 16-byte boundary (the tensor-core kernels copy 16 bytes at a time)."""
    if t is None:
        return None
    t = t.contiguous()
    return t.clone() if t.is_cuda and t.data_ptr() % 16 else t


@fused_op("megalith::attention_fwd")
def _attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    q_offset: int,
    k_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, cu_q, cu_k = (_ready(t) for t in (q, k, v, cu_seqlens_q, cu_seqlens_k))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_q is not None), dtype=torch.float32, device=q.device)
    _K.attention_forward(
        _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"), _desc(lse, "lse"), _desc(cu_q, "cu_seqlens_q"),
        _desc(cu_k, "cu_seqlens_k"), max_seqlen_q, max_seqlen_k, scale, causal, q_offset, k_offset, _stream(q),
    )  # fmt: skip
    return out, lse


@_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, q_offset, k_offset):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@fused_op("megalith::attention_bwd")
def _attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    q_offset: int,
    k_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad, lse, cu_q, cu_k = (_ready(t) for t in (q, k, v, out, grad, lse, cu_seqlens_q, cu_seqlens_k))
    grad_lse = None if grad_lse is None else grad_lse.float().contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    delta = torch.empty_like(lse)
    _K.attention_backward(
        _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"), _desc(grad, "grad_out"), _desc(lse, "lse"),
        _desc(grad_lse, "grad_lse"), _desc(delta, "delta"), _desc(cu_q, "cu_seqlens_q"), _desc(cu_k, "cu_seqlens_k"),
        max_seqlen_q, max_seqlen_k, _desc(dq, "grad_q"), _desc(dk, "grad_k"), _desc(dv, "grad_v"), scale, causal,
        q_offset, k_offset, _stream(q),
    )  # fmt: skip
    return dq, dk, dv


@_attn_bwd.register_fake
def _(q, k, v, out, grad, lse, grad_lse, cu_q, cu_k, max_q, max_k, scale, causal, q_offset, k_offset):
    fmt = torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=fmt) for t in (q, k, v))


def _attn_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *ctx.args = inputs
    ctx.set_materialize_grads(False)  # an unused output (often lse) then arrives as None, not zeros
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output)


def _attn_backward(ctx, grad_out, grad_lse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attn_bwd(q, k, v, out, grad_out, lse, grad_lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def _check_same(t: torch.Tensor, q: torch.Tensor, name: str) -> None:
    if t.dtype != q.dtype or t.device != q.device:
        raise ValueError(f"{name} must be {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(f"the number of k/v heads ({heads_kv}) must divide the number of q heads ({heads_q})")


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Checks the self-attention shapes of `attention`: q [B, S, Nq, D], k and v [B, S, Nkv, D]."""
    _check_float(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, seq, heads_q, head_dim], got shape {tuple(q.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        _check_same(t, q, name)
        if t.dim() != 4 or t.shape[:2] != q.shape[:2] or t.shape[3] != q.shape[3]:
            raise ValueError(
                f"{name} must be [batch={q.shape[0]}, seq={q.shape[1]}, heads_kv, head_dim={q.shape[3]}], "
                f"got shape {tuple(t.shape)}"
            )
    _check_heads(q, k, v)


def _check_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, Sq, Nq, D], k and v [B, Sk, Nkv, D]."""
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, seq_q, heads_q, head_dim] (or pass cu_seqlens_q), got {tuple(q.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        _check_same(t, q, name)
        if t.dim() != 4 or t.shape[0] != q.shape[0] or t.shape[3] != q.shape[3]:
            raise ValueError(
                f"{name} must be [batch={q.shape[0]}, seq_k, heads_kv, head_dim={q.shape[3]}], got {tuple(t.shape)}"
            )
    _check_heads(q, k, v)


def _max_seqlen(cu: torch.Tensor, name: str, total: int) -> int:
    """The longest sequence of `cu` after checking it (reads it on the host: a device sync on CUDA)."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    lengths = [b - a for a, b in itertools.pairwise(values)]
    for i, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"{name} must be non-decreasing, got {values[i]} then {values[i + 1]} at index {i + 1}")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must be the number of tokens ({total}), got {values[-1]}")
    return max(lengths, default=0)


def _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k) -> tuple[int, int]:
    """q [Tq, Nq, D], k and v [Tk, Nkv, D], cu_seqlens int32 [num_seqs + 1]; returns (max_seqlen_q, max_seqlen_k)."""
    if q.dim() != 3:
        raise ValueError(f"with cu_seqlens, q must be packed [tokens, heads_q, head_dim], got {tuple(q.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        _check_same(t, q, name)
        if t.dim() != 3 or t.shape[2] != q.shape[2]:
            raise ValueError(f"{name} must be [tokens_k, heads_kv, head_dim={q.shape[2]}], got {tuple(t.shape)}")
    _check_heads(q, k, v)
    for cu, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name} must be a 1-D int32 tensor [num_seqs + 1], got {type(cu).__name__}")
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(
                f"{name} must be a 1-D int32 tensor [num_seqs + 1], got {cu.dtype} of shape {tuple(cu.shape)}"
            )
        if cu.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {cu.device}")
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_k has {cu_k.numel()} entries but cu_seqlens_q has {cu_q.numel()}")
    sizes = []
    for cu, limit, name, total in ((cu_q, max_q, "q", q.shape[0]), (cu_k, max_k, "k", k.shape[0])):
        if limit is None:
            sizes.append(_max_seqlen(cu, f"cu_seqlens_{name}", total))
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_seqlen_{name} must be a non-negative int, got {limit!r}")
        else:
            sizes.append(limit)
    return sizes[0], sizes[1]


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    q_offset: int = 0,
    k_offset: int = 0,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T) v and its log-sum-exp, in tiles (never an S x S matrix), dense or packed.

    Dense: q [B, Sq, Nq, D], k and v [B, Sk, Nkv, D]; returns out [B, Sq, Nq, D] and lse float32 [B, Nq, Sq]
    (torch's `_scaled_dot_product_flash_attention` layout). Packed (varlen, flash-attn's `flash_attn_varlen_func`
    convention): q [Tq, Nq, D], k and v [Tk, Nkv, D] hold the sequences back to back; cu_seqlens_q/k are int32
    [num_seqs + 1] on q's device, sequence i being rows cu[i]:cu[i+1], and attend only within their own
    sequence; returns out [Tq, Nq, D] and lse float32 [Nq, Tq]. cu_seqlens_k defaults to cu_seqlens_q.

    lse[.., h, i] = log(sum_j exp(scale * q_i . k_j)) over the keys query i sees (natural log, float32; -inf
    and a zero output row when it sees none). Two partial results over disjoint key blocks combine exactly as
    lse = logaddexp(lse1, lse2), out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse) (ring attention).
    Both outputs are differentiable: the backward pass takes gradients of out and of lse.

    Args:
        q, k, v: inputs; Nkv must divide Nq (query head h reads kv head h // (Nq // Nkv)).
        causal: hide key j from query i when k_offset + j > q_offset + i, positions counted within each
            sequence (offsets are the same for every sequence and ignored when not causal). With the defaults
            that is the usual top-left causal mask; flash-attn's bottom-right alignment is q_offset = Sk - Sq.
        scale: score scale, 1/sqrt(D) by default.
        q_offset, k_offset: global position of the first query / key (e.g. this rank's chunk in ring attention).
        cu_seqlens_q, cu_seqlens_k: packed mode (see above).
        max_seqlen_q, max_seqlen_k: the longest sequence of each; computed from cu_seqlens when None, which
            reads them on the host (a device sync on CUDA). Given values are trusted on CUDA: a sequence longer
            than max_seqlen leaves its later rows unwritten (CPU checks the cu_seqlens contents every call).

    Backends: CPU (float32/bfloat16, any D), CUDA float16/bfloat16 on tensor cores (sm80+, D 64 or 128), CUDA
    float32 on a simple scalar path (D 64 or 128); other D on CUDA, or a module built without CUDA, run
    `megalith.kernels.reference.attention_with_lse` (S x S per sequence).
    """
    _check_float(q, "q")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None:
            raise ValueError("cu_seqlens_k was given without cu_seqlens_q")
        cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        max_q, max_k = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q/max_seqlen_k only apply to packed inputs (with cu_seqlens_q)")
        _check_dense(q, k, v)
        max_q, max_k = q.shape[1], k.shape[1]
    for value, name in ((q_offset, "q_offset"), (k_offset, "k_offset")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    head_dim = q.shape[-1]
    use_ref = _use_reference(q)
    if q.is_cuda and head_dim not in _CUDA_HEAD_DIMS and not use_ref:
        warnings.warn(
            f"megalith attention: head_dim {head_dim} has no CUDA kernel (built for {_CUDA_HEAD_DIMS}); "
            "running the plain PyTorch reference",
            stacklevel=2,
        )
        use_ref = True
    if use_ref:
        return ref.attention_with_lse(
            q, k, v, causal, scale, q_offset=q_offset, k_offset=k_offset, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip
    return _attn_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, bool(causal), int(q_offset), int(k_offset)
    )


def attention_with_lse_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    *,
    q_offset: int = 0,
    k_offset: int = 0,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention over these keys when the softmax is normalised by `lse` and produced `out`.

    With the `out` and `lse` of `attention_with_lse` on the same inputs this is its backward pass. With the
    merged `out` and `lse` of a larger attention (several key blocks combined by the online-softmax rule) it is
    this key block's share of that attention's gradients: ring attention's backward calls it once per block and
    adds up dq (and each block's dk, dv). Inputs and layouts as `attention_with_lse`; `out` and `grad_out` have
    the shape of q and `lse` is float32 in the layout `attention_with_lse` returns. No S x S buffer is built.
    """
    _check_float(q, "q")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen:
        if cu_seqlens_q is None:
            raise ValueError("cu_seqlens_k was given without cu_seqlens_q")
        cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        max_q, max_k = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    else:
        _check_dense(q, k, v)
        max_q, max_k = q.shape[1], k.shape[1]
    for t, name in ((out, "out"), (grad_out, "grad_out")):
        _check_same(t, q, name)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    want = _lse_shape(q, varlen)
    if lse.dtype != torch.float32 or tuple(lse.shape) != want or lse.device != q.device:
        raise ValueError(
            f"lse must be float32 {want} on {q.device}, got {lse.dtype} {tuple(lse.shape)} on {lse.device}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _use_reference(q) or (q.is_cuda and q.shape[-1] not in _CUDA_HEAD_DIMS):
        return ref.attention_with_lse_backward(
            q, k, v, out, grad_out, lse, causal, scale, q_offset=int(q_offset), k_offset=int(k_offset),
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        )  # fmt: skip
    return _attn_bwd(
        q, k, v, out, grad_out, lse, None, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, bool(causal),
        int(q_offset), int(k_offset),
    )  # fmt: skip


def attention(
    q_BSND: torch.Tensor, k_BSND: torch.Tensor, v_BSND: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * q k^T) v with grouped-query heads, computed in tiles (never an S x S matrix).

    q is [B, S, Nq, D], k and v [B, S, Nkv, D] with Nkv dividing Nq (query head h reads kv head
    h // (Nq // Nkv)); `scale` defaults to 1/sqrt(D). Only the output and the float32 log-sum-exp are saved
    for the backward pass. The output of `attention_with_lse` on the same inputs.
    """
    _check_attention(q_BSND, k_BSND, v_BSND)
    return attention_with_lse(q_BSND, k_BSND, v_BSND, causal, scale)[0]
