"""Cross-entropy over logits whose vocabulary is split across tensor-parallel ranks.

Stable (the global max is subtracted before exponentiating), with label smoothing spread over the true
vocabulary only (padding columns never receive probability), and an ignore index whose tokens get zero loss
and zero gradient. Each rank keeps only its [.., V/tp] logits; three small tensors are all-reduced.

Two implementations with the same semantics: plain torch (`kernels="torch"`), and the compiled kernels of
`megalith.kernels.ops` (`kernels="fused"`): `cross_entropy_partials` gives each shard's max, sum-exp, target logit
and logit sum in one pass, and `cross_entropy_grad` the shard's gradient from the global log-sum-exp, so neither
direction materialises a second [.., V/tp] float32 tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalith.core.models.ops import auto_kernel, fused_kernel_ops
from megalith.core.parallel.mappings import group_size

_FUSED_USER = "vocab_parallel_cross_entropy(kernels='fused')"


def _all_reduce_(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place (unlike mappings' autograd all-reduce); returns `x`."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss from local logits (all-reduce of max, then of sum-exp / target / smoothing sums).
    Backward: (softmax - smoothed one-hot) * grad on the local columns; nothing is communicated."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, vocab_size, label_smoothing, ignore_index):
        num_local = logits.shape[-1]
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        cols = torch.arange(vocab_start, vocab_start + num_local, device=logits.device)
        valid = cols < vocab_size  # padding columns are outside the true vocabulary
        x = x.masked_fill(~valid, float("-inf"))
        row_max = _all_reduce_(x.amax(dim=-1), group, dist.ReduceOp.MAX)
        shifted = x - row_max.unsqueeze(-1)
        exp = shifted.exp()

        ignored = labels == ignore_index
        local_label = labels - vocab_start
        owned = (local_label >= 0) & (local_label < num_local) & ~ignored
        index = local_label.masked_fill(~owned, 0).unsqueeze(-1)
        target = shifted.gather(-1, index).squeeze(-1).masked_fill(~owned, 0.0)
        stats = torch.stack(
            [exp.sum(-1), target, shifted.masked_fill(~valid, 0.0).sum(-1)], dim=0
        )  # [3, *tokens]: one all-reduce for all three
        _all_reduce_(stats, group)
        sum_exp, target, shifted_sum = stats
        log_z = sum_exp.log()
        loss = log_z - target
        if label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_z - shifted_sum / vocab_size)
        loss = loss.masked_fill(ignored, 0.0)

        ctx.save_for_backward(exp, sum_exp, index, owned, ignored, valid)
        ctx.label_smoothing, ctx.vocab_size, ctx.dtype = label_smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, index, owned, ignored, valid = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = exp / sum_exp.unsqueeze(-1)
        one_hot = torch.zeros_like(grad).scatter_(-1, index, owned.unsqueeze(-1).to(grad.dtype))
        grad = grad - (1.0 - eps) * one_hot
        if eps > 0:
            grad = grad - (eps / ctx.vocab_size) * valid.to(grad.dtype)
        grad = grad * grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1).to(grad.dtype)
        return grad.to(ctx.dtype), None, None, None, None, None, None


_FUSED_DTYPES = (torch.float32, torch.bfloat16)


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    """The same loss through megalith.kernels.ops: per-shard partials, one MAX and one SUM all-reduce; the
    backward recomputes softmax from the saved global log-sum-exp (one float32 per token)."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start, vocab_size, label_smoothing, ignore_index):
        ops = fused_kernel_ops(_FUSED_USER)
        num_real = max(0, min(logits.shape[-1], vocab_size - vocab_start))  # columns past vocab_size are padding
        real = logits[..., :num_real]
        if num_real > 0:
            local_max, local_sumexp, target, logit_sum = ops.cross_entropy_partials(real, labels, vocab_start)
        else:  # a shard of padding only
            local_max = torch.full(labels.shape, float("-inf"), device=logits.device)
            local_sumexp, target, logit_sum = (torch.zeros(labels.shape, device=logits.device) for _ in range(3))
        row_max = _all_reduce_(local_max.clone(), group, dist.ReduceOp.MAX)
        scaled = local_sumexp * torch.exp(local_max - row_max)  # exp(-inf) = 0 for an empty shard
        stats = _all_reduce_(torch.stack([scaled, target, logit_sum], dim=0), group)
        sum_exp, target, logit_sum = stats
        lse = row_max + sum_exp.log()
        loss = lse - target
        if label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - logit_sum / vocab_size)
        ignored = labels == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        ctx.save_for_backward(logits, labels, lse)
        ctx.args = (num_real, vocab_start, vocab_size, ignore_index, label_smoothing)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        num_real, vocab_start, vocab_size, ignore_index, label_smoothing = ctx.args
        grad = torch.zeros_like(logits)  # padding columns get no gradient
        if num_real > 0:
            grad[..., :num_real] = fused_kernel_ops(_FUSED_USER).cross_entropy_grad(
                logits[..., :num_real], labels, lse, grad_loss.float().contiguous(), vocab_start, vocab_size,
                ignore_index, label_smoothing,
            )  # fmt: skip
        return grad, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    kernels: str = "torch",
) -> torch.Tensor:
    """Per-token cross-entropy (float32, or float64 for float64 logits; 0 where `labels == ignore_index`).

    Args:
        logits: [..., V_local] this rank's logits: global columns vocab_start .. vocab_start + V_local - 1.
        labels: [...] global token ids.
        group: the tp group the vocabulary is split over (None: all columns are here).
        vocab_start: global index of this rank's first column.
        vocab_size: the true vocabulary; columns at or past it are padding and never predicted
            (default: every column is real).
        label_smoothing: weight of the uniform distribution over the true vocabulary in the target.
        ignore_index: label value that contributes no loss and no gradient.
        kernels: "torch" (plain torch ops), "fused" (megalith.kernels.ops) or "auto" (the measured faster of the
            two for this device type and dtype; as RuntimeConfig.kernels). The fused
            path takes float32 and bfloat16 logits; other dtypes (float64, float16) use the torch path.
    """
    if kernels not in ("auto", "torch", "fused"):
        raise ValueError(
            f"vocab_parallel_cross_entropy: unknown kernels {kernels!r}; expected 'auto', 'torch' or 'fused'"
        )
    if kernels == "auto":
        kernels = auto_kernel("cross_entropy", logits.device.type, logits.dtype)
    if vocab_size is None:
        vocab_size = vocab_start + logits.shape[-1] if group_size(group) == 1 else None
        if vocab_size is None:
            raise ValueError("vocab_parallel_cross_entropy: pass vocab_size when the vocabulary is split")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}[:-1]")
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(
            f"labels out of range [0, {vocab_size}) (ignore_index {ignore_index}): e.g. {labels[bad][0].item()}"
        )
    if kernels == "fused" and logits.dtype in _FUSED_DTYPES:
        return _FusedVocabParallelCrossEntropy.apply(
            logits, labels, group, vocab_start, vocab_size, float(label_smoothing), ignore_index
        )
    if group_size(group) == 1 and vocab_start == 0:
        # Everything is local: PyTorch's fused kernel has the same semantics on the true-vocabulary columns.
        flat = logits[..., :vocab_size].flatten(0, -2)
        flat = flat if flat.dtype == torch.float64 else flat.float()
        loss = F.cross_entropy(
            flat, labels.flatten(), reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
        )
        return loss.view(labels.shape)
    return _VocabParallelCrossEntropy.apply(
        logits, labels, group, vocab_start, vocab_size, float(label_smoothing), ignore_index
    )
