"""Cross-entropy (full and vocab-parallel pieces) and FlashAttention-style attention as torch operators.

Re-exported by `megalith.kernels.ops`; see there for the conventions. Shapes: B batch, S sequence,
Nq/Nkv query/key-value heads, D head dim, V vocabulary (Vl: the local shard of it).
"""

from __future__ import annotations

import math
import warnings

import torch

from megalith.kernels import reference as ref
from megalith.kernels._dispatch import _CUDA_HEAD_DIMS, _K, _check_float, _desc, _empty_rows, _stream, _use_reference

# ---- cross-entropy -------------------------------------------------------------------------------------------


@torch.library.custom_op("megalith::cross_entropy_fwd", mutates_args=())
def _ce_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits, target = logits.contiguous(), target.contiguous()
    loss, lse = _empty_rows(logits), _empty_rows(logits)
    _K.cross_entropy_forward(
        _desc(logits, "logits"), _desc(target, "target"), _desc(loss, "loss"), _desc(lse, "lse"), ignore_index,
        label_smoothing, _stream(logits),
    )  # fmt: skip
    return loss, lse


@_ce_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing):
    return _empty_rows(logits), _empty_rows(logits)


@torch.library.custom_op("megalith::cross_entropy_bwd", mutates_args=())
def _ce_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    vocab_start: int,
    vocab_total: int,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    logits, target = logits.contiguous(), target.contiguous()
    lse, grad_loss = lse.float().contiguous(), grad_loss.float().contiguous()
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _K.cross_entropy_backward(
        _desc(logits, "logits"), _desc(target, "target"), _desc(lse, "lse"), _desc(grad_loss, "grad_loss"),
        _desc(dlogits, "grad_logits"), vocab_start, vocab_total, ignore_index, label_smoothing, _stream(logits),
    )  # fmt: skip
    return dlogits


@_ce_bwd.register_fake
def _(logits, target, lse, grad_loss, vocab_start, vocab_total, ignore_index, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup(ctx, inputs, output):
    logits, target, ctx.ignore_index, ctx.label_smoothing = inputs
    ctx.save_for_backward(logits, target, output[1])


def _ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    vocab = logits.shape[-1]
    dlogits = _ce_bwd(logits, target, lse, grad_loss, 0, vocab, ctx.ignore_index, ctx.label_smoothing)
    return dlogits, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


@torch.library.custom_op("megalith::cross_entropy_partials", mutates_args=())
def _ce_partials(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, target = logits.contiguous(), target.contiguous()
    outs = [_empty_rows(logits) for _ in range(4)]
    names = ("local_max", "local_sumexp", "target_logit", "sum_logits")
    _K.cross_entropy_partials(
        _desc(logits, "logits"), _desc(target, "target"), *(_desc(t, n) for t, n in zip(outs, names, strict=True)),
        vocab_start, _stream(logits),
    )  # fmt: skip
    return tuple(outs)


@_ce_partials.register_fake
def _(logits, target, vocab_start):
    return tuple(_empty_rows(logits) for _ in range(4))


def _check_ce(logits: torch.Tensor, target: torch.Tensor) -> None:
    _check_float(logits, "logits")
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64 class ids, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(logits.shape[:-1])} (logits without V), got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target must be on the device of logits ({logits.device}), got {target.device}")


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-token cross-entropy of logits [..., V] against target [...] (int64), as float32 [...].

    Tokens whose target is `ignore_index` get loss 0 and no gradient. With label smoothing eps the loss is
    (1 - eps) * (lse - x_target) + eps * (lse - mean(x)), as in torch.nn.functional.cross_entropy. Only the
    per-token log-sum-exp is saved for the backward pass (no second [..., V] tensor).
    """
    _check_ce(logits, target)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if _use_reference(logits):
        return ref.cross_entropy(logits.float(), target, ignore_index, label_smoothing)
    vocab = logits.shape[-1]
    loss, _ = _ce_fwd(logits.reshape(-1, vocab), target.reshape(-1), int(ignore_index), float(label_smoothing))
    return loss.reshape(target.shape)


def cross_entropy_partials(logits: torch.Tensor, target: torch.Tensor, vocab_start: int = 0):
    """Per-token statistics of a vocabulary shard, for a vocab-parallel cross-entropy.

    Args:
        logits: [..., Vl] logits of global vocabulary ids vocab_start .. vocab_start + Vl - 1.
        target: [...] int64 global ids.
        vocab_start: global id of local column 0.

    Returns:
        float32 [...] tensors (local_max, local_sumexp, target_logit, sum_logits): the shard's max, its
        sum of exp(x - local_max), the target's logit (0 when the target is not in this shard) and the sum
        of its logits. Ranks combine them as M = max(local_max), lse = M + log(sum(local_sumexp *
        exp(local_max - M))), x_t = sum(target_logit), mean(x) = sum(sum_logits) / V; then
        `cross_entropy_grad` gives each shard's gradient from the global lse. Not differentiable itself.
    """
    _check_ce(logits, target)
    if _use_reference(logits):
        return ref.cross_entropy_partials(logits.float(), target, vocab_start)
    vocab = logits.shape[-1]
    outs = _ce_partials(logits.reshape(-1, vocab), target.reshape(-1), int(vocab_start))
    return tuple(t.reshape(target.shape) for t in outs)


def cross_entropy_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    vocab_start: int = 0,
    vocab_total: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Gradient of the per-token loss with respect to a (shard of the) logits, from the global log-sum-exp.

    grad = grad_loss * (softmax(x) - (1 - eps) * onehot(target) - eps / vocab_total), zero for ignored tokens;
    `vocab_total` defaults to the last dim of logits (no sharding).
    """
    _check_ce(logits, target)
    vocab = logits.shape[-1]
    vocab_total = vocab if vocab_total is None else int(vocab_total)
    for t, name in ((lse, "lse"), (grad_loss, "grad_loss")):
        if t.shape != target.shape:
            raise ValueError(f"{name} must have the shape of target {tuple(target.shape)}, got {tuple(t.shape)}")
    if _use_reference(logits):
        probs = torch.exp(logits.float() - lse.float()[..., None])
        local = target - vocab_start
        onehot = torch.zeros_like(probs)
        inside = (local >= 0) & (local < vocab)
        onehot.scatter_(-1, local.clamp(0, vocab - 1)[..., None], inside[..., None].float())
        grad = probs - (1 - label_smoothing) * onehot - label_smoothing / vocab_total
        grad = grad * (grad_loss.float() * (target != ignore_index))[..., None]
        return grad.to(logits.dtype)
    out = _ce_bwd(
        logits.reshape(-1, vocab), target.reshape(-1), lse.reshape(-1), grad_loss.reshape(-1), int(vocab_start),
        vocab_total, int(ignore_index), float(label_smoothing),
    )  # fmt: skip
    return out.reshape(logits.shape)


# ---- attention -----------------------------------------------------------------------------------------------


@torch.library.custom_op("megalith::attention_fwd", mutates_args=())
def _attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, seq, heads = q.shape[:3]
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    _K.attention_forward(
        _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"), _desc(lse, "lse"), scale, causal, _stream(q)
    )
    return out, lse


@_attn_fwd.register_fake
def _(q, k, v, scale, causal):
    batch, seq, heads = q.shape[:3]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(batch, heads, seq, dtype=torch.float32)


@torch.library.custom_op("megalith::attention_bwd", mutates_args=())
def _attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad = (t.contiguous() for t in (q, k, v, out, grad))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    _K.attention_backward(
        _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"), _desc(grad, "grad_out"), _desc(lse, "lse"),
        _desc(delta, "delta"), _desc(dq, "grad_q"), _desc(dk, "grad_k"), _desc(dv, "grad_v"), scale, causal,
        _stream(q),
    )  # fmt: skip
    return dq, dk, dv


@_attn_bwd.register_fake
def _(q, k, v, out, grad, lse, scale, causal):
    fmt = torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=fmt) for t in (q, k, v))


def _attn_setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.causal = inputs
    ctx.save_for_backward(q, k, v, *output)


def _attn_backward(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*_attn_bwd(q, k, v, out, grad, lse, ctx.scale, ctx.causal), None, None)


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_float(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, seq, heads_q, head_dim], got shape {tuple(q.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
        if t.dim() != 4 or t.shape[:2] != q.shape[:2] or t.shape[3] != q.shape[3]:
            raise ValueError(
                f"{name} must be [batch={q.shape[0]}, seq={q.shape[1]}, heads_kv, head_dim={q.shape[3]}], "
                f"got shape {tuple(t.shape)}"
            )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"the number of k/v heads ({k.shape[2]}) must divide the number of q heads ({q.shape[2]})")


def attention(
    q_BSND: torch.Tensor, k_BSND: torch.Tensor, v_BSND: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * q k^T) v with grouped-query heads, computed in tiles (never an S x S matrix).

    q is [B, S, Nq, D], k and v [B, S, Nkv, D] with Nkv dividing Nq (query head h reads kv head
    h // (Nq // Nkv)); `scale` defaults to 1/sqrt(D). Only the output and the float32 log-sum-exp are saved
    for the backward pass. The CUDA kernels take D in (64, 128); other D on CUDA run the reference.
    """
    _check_attention(q_BSND, k_BSND, v_BSND)
    scale = 1.0 / math.sqrt(q_BSND.shape[-1]) if scale is None else float(scale)
    head_dim = q_BSND.shape[-1]
    if q_BSND.is_cuda and head_dim not in _CUDA_HEAD_DIMS and not _use_reference(q_BSND):
        warnings.warn(
            f"megalith attention: head_dim {head_dim} has no CUDA kernel (built for {_CUDA_HEAD_DIMS}); "
            "running the plain PyTorch reference",
            stacklevel=2,
        )
        return ref.attention(q_BSND, k_BSND, v_BSND, causal, scale)
    if _use_reference(q_BSND):
        return ref.attention(q_BSND, k_BSND, v_BSND, causal, scale)
    return _attn_fwd(q_BSND, k_BSND, v_BSND, scale, bool(causal))[0]
