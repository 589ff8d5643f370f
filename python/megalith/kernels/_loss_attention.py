"""Cross-entropy (full and vocab-parallel pieces) as torch operators; attention lives in `_attention`.

Re-exported by `megalith.kernels.ops`; see there for the conventions. Shapes: V vocabulary (Vl: the local
shard of it).
"""

from __future__ import annotations

import torch

from megalith.kernels import reference as ref
from megalith.kernels._dispatch import _K, _check_float, _desc, _empty_rows, _rows, _stream, _use_reference, fused_op

# ---- cross-entropy -------------------------------------------------------------------------------------------


@fused_op("megalith::cross_entropy_fwd")
def _ce_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits, target = _rows(logits), target.contiguous()
    loss, lse = _empty_rows(logits), _empty_rows(logits)
    _K.cross_entropy_forward(
        _desc(logits, "logits"), _desc(target, "target"), _desc(loss, "loss"), _desc(lse, "lse"), ignore_index,
        label_smoothing, _stream(logits),
    )  # fmt: skip
    return loss, lse


@_ce_fwd.register_fake
def _(logits, target, ignore_index, label_smoothing):
    return _empty_rows(logits), _empty_rows(logits)


@fused_op("megalith::cross_entropy_bwd")
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
    logits, target = _rows(logits), target.contiguous()
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


@fused_op("megalith::cross_entropy_partials")
def _ce_partials(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, target = _rows(logits), target.contiguous()
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
