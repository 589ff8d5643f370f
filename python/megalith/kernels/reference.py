"""Plain-PyTorch references of the fused kernels: the tests' ground truth and the fallback on CUDA tensors
when megalith-kernels was built without CUDA.

Every function computes in the dtype of its inputs (call it with float64 tensors for a float64 reference)
and has the same signature and semantics as its counterpart in `megalith.kernels.ops`.
Shapes: B batch, S sequence, N heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, zero_centered_weight: bool = False):
    scale = weight + 1 if zero_centered_weight else weight
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    zero_centered_weight: bool = False,
):
    scale = weight + 1 if zero_centered_weight else weight
    return F.layer_norm(x, (x.shape[-1],), scale, bias, eps)


def scaled_softmax(x: torch.Tensor, scale: float = 1.0, causal: bool = False, mask: torch.Tensor | None = None):
    sq, sk = x.shape[-2], x.shape[-1]
    hidden = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if causal:
        # Key j is hidden from query i when j > i + (sk - sq): bottom-right aligned, as in the kernels.
        hidden = hidden | torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(sk - sq + 1)
    if mask is not None:
        hidden = hidden | mask
    scores = (x * scale).masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs.masked_fill(hidden.all(-1, keepdim=True), 0.0)


def rope(x_BSND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False):
    half = cos.shape[-1]
    rot = 2 * half
    cos = cos.to(x_BSND.dtype)[None, :, None, :]
    sin = sin.to(x_BSND.dtype)[None, :, None, :]
    x_rot, x_pass = x_BSND[..., :rot], x_BSND[..., rot:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        y = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
        y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((y, x_pass), dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor):
    return F.silu(gate) * up


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "tanh"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> torch.Tensor:
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return loss.reshape(target.shape)


def cross_entropy_partials(logits: torch.Tensor, target: torch.Tensor, vocab_start: int = 0):
    local_max = logits.max(-1).values
    local_sumexp = torch.exp(logits - local_max[..., None]).sum(-1)
    local = target - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1)[..., None])[..., 0]
    target_logit = torch.where(inside, picked, torch.zeros_like(picked))
    return local_max, local_sumexp, target_logit, logits.sum(-1)


def attention(
    q_BSND: torch.Tensor,
    k_BSND: torch.Tensor,
    v_BSND: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    group = q_BSND.shape[2] // k_BSND.shape[2]
    scale = 1.0 / math.sqrt(q_BSND.shape[-1]) if scale is None else scale
    q = q_BSND.transpose(1, 2)
    k = k_BSND.repeat_interleave(group, dim=2).transpose(1, 2)
    v = v_BSND.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        s = q.shape[2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def _attention_lse_dense(q_BSND, k_BSND, v_BSND, causal: bool, scale: float, shift: int):
    """Dense attention and log-sum-exp; query i sees key j iff j <= i + shift when causal."""
    group = q_BSND.shape[2] // k_BSND.shape[2]
    q = q_BSND.transpose(1, 2)
    if k_BSND.shape[1] == 0:  # no keys at all: every row sees nothing
        return torch.zeros_like(q_BSND), q.new_full(q.shape[:3], -math.inf)
    k = k_BSND.repeat_interleave(group, dim=2).transpose(1, 2)
    v = v_BSND.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(shift + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    # Written out (not torch.logsumexp) so that rows with every key hidden give lse = -inf, zero outputs and
    # zero (not NaN) gradients.
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = torch.exp(scores - row_max).sum(-1)
    seen = total > 0
    lse = torch.where(seen, torch.log(torch.where(seen, total, torch.ones_like(total))) + row_max[..., 0], -math.inf)
    probs = torch.exp(scores - torch.where(seen, lse, torch.zeros_like(lse))[..., None])
    return (probs @ v).transpose(1, 2), lse


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
):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    shift = q_offset - k_offset
    if cu_seqlens_q is None:
        return _attention_lse_dense(q, k, v, causal, scale, shift)
    # Packed: every sequence on its own (max_seqlen_* are only launch hints for the kernels).
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = bounds_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[i : i + 2], bounds_k[i : i + 2]
        out, lse = _attention_lse_dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, scale, shift)
        outs.append(out[0])
        lses.append(lse[0])
    if not outs:
        return q.new_zeros(q.shape), q.new_full((q.shape[1], q.shape[0]), -math.inf)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _attention_lse_backward_dense(q_BSND, k_BSND, v_BSND, out_BSND, grad_BSND, lse_BNS, causal, scale, shift):
    """dq, dk, dv of dense attention whose probabilities are exp(scale * q k^T - lse) (lse may be a merged one)."""
    group = q_BSND.shape[2] // k_BSND.shape[2]
    q, o, do = (t.transpose(1, 2) for t in (q_BSND, out_BSND, grad_BSND))
    k = k_BSND.repeat_interleave(group, dim=2).transpose(1, 2)
    v = v_BSND.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * scale
    seen = torch.isfinite(lse_BNS)[..., None]
    probs = torch.where(seen, torch.exp(scores - torch.where(seen, lse_BNS[..., None], torch.zeros_like(scores))), 0)
    if causal:
        sq, sk = scores.shape[-2:]
        probs = probs.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(shift + 1), 0.0)
    delta = (do * o).sum(-1, keepdim=True)
    dscores = probs * (do @ v.transpose(-1, -2) - delta) * scale
    dq, dk, dv = dscores @ k, dscores.transpose(-1, -2) @ q, probs.transpose(-1, -2) @ do

    def per_kv_head(t):  # [B, Nq, Sk, D] -> [B, Sk, Nkv, D], summing each kv head's query group
        b, _, sk, d = t.shape
        return t.view(b, -1, group, sk, d).sum(2).transpose(1, 2)

    return dq.transpose(1, 2), per_kv_head(dk), per_kv_head(dv)


def attention_with_lse_backward(
    q, k, v, out, grad_out, lse, causal=True, scale=None, *, q_offset=0, k_offset=0, cu_seqlens_q=None,
    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
):  # fmt: skip
    """The plain-PyTorch counterpart of `megalith.kernels.ops.attention_with_lse_backward` (S x S per sequence)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    shift = q_offset - k_offset
    if cu_seqlens_q is None:
        return _attention_lse_backward_dense(q, k, v, out, grad_out, lse, causal, scale, shift)
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = bounds_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[i : i + 2], bounds_k[i : i + 2]
        if q1 == q0 or k1 == k0:
            continue
        parts = _attention_lse_backward_dense(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1], grad_out[None, q0:q1],
            lse[None, :, q0:q1], causal, scale, shift,
        )  # fmt: skip
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = parts[0][0], parts[1][0], parts[2][0]
    return dq, dk, dv
