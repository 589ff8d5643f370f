"""The hot ops of the model behind one switch: plain PyTorch ("torch") or Megalith's fused kernels ("fused").

Shapes: x_BSND is [batch, sequence, heads, head_dim]; cos/sin are [S, D/2] (rotate-half RoPE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    """Reference implementations: scaled_dot_product_attention and elementwise PyTorch."""

    name = "torch"

    @staticmethod
    def attention(q_BSND, k_BSKD, v_BSKD, *, causal: bool = True, dropout_p: float = 0.0):
        groups = q_BSND.shape[2] // k_BSKD.shape[2]
        if groups > 1:  # grouped-query attention: q head h reads kv head h // groups
            k_BSKD = k_BSKD.repeat_interleave(groups, dim=2)
            v_BSKD = v_BSKD.repeat_interleave(groups, dim=2)
        out_BNSD = F.scaled_dot_product_attention(
            q_BSND.transpose(1, 2), k_BSKD.transpose(1, 2), v_BSKD.transpose(1, 2),
            is_causal=causal, dropout_p=dropout_p,
        )  # fmt: skip
        return out_BNSD.transpose(1, 2)

    @staticmethod
    def rms_norm(x, weight, eps: float):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    @staticmethod
    def layer_norm(x, weight, bias, eps: float):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def rope(x_BSND, cos_SR, sin_SR):
        half = x_BSND.shape[-1] // 2
        x1, x2 = x_BSND[..., :half], x_BSND[..., half:]
        cos, sin = cos_SR[None, :, None, :].to(x_BSND.dtype), sin_SR[None, :, None, :].to(x_BSND.dtype)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @staticmethod
    def swiglu(gate, up):
        return F.silu(gate) * up

    @staticmethod
    def gelu(x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def cross_entropy(logits, target, *, ignore_index: int = -100, label_smoothing: float = 0.0):
        """Per-token loss [...] (float32, or float64 for float64 logits) over the last dim of `logits`."""
        flat = logits.flatten(0, -2)
        flat = flat if flat.dtype == torch.float64 else flat.float()
        loss = F.cross_entropy(
            flat, target.flatten(), reduction="none", ignore_index=ignore_index, label_smoothing=label_smoothing
        )
        return loss.view(target.shape)


class FusedOps:
    """Megalith's compiled kernels (megalith.kernels.ops), imported on first use.

    The module is looked up on each call rather than stored, so models using these ops still deep-copy and
    pickle.
    """

    name = "fused"

    def __init__(self):
        _kernel_ops()  # fail at model construction, with the reason, rather than in the first forward

    @property
    def _ops(self):
        return _kernel_ops()

    def attention(self, q_BSND, k_BSKD, v_BSKD, *, causal: bool = True, dropout_p: float = 0.0):
        if dropout_p:
            raise ValueError("kernels='fused' attention has no dropout; set attention_dropout to 0")
        return self._ops.attention(q_BSND, k_BSKD, v_BSKD, causal=causal)

    def rms_norm(self, x, weight, eps: float):
        return self._ops.rms_norm(x, weight, eps)

    def layer_norm(self, x, weight, bias, eps: float):
        return self._ops.layer_norm(x, weight, bias, eps)

    def rope(self, x_BSND, cos_SR, sin_SR):
        return self._ops.rope(x_BSND, cos_SR, sin_SR)

    def swiglu(self, gate, up):
        return self._ops.swiglu(gate, up)

    def gelu(self, x):
        return self._ops.bias_gelu(x, None, approximate="tanh")

    def cross_entropy(self, logits, target, *, ignore_index: int = -100, label_smoothing: float = 0.0):
        return self._ops.cross_entropy(
            logits.contiguous(), target, ignore_index=ignore_index, label_smoothing=label_smoothing
        )


def _kernel_ops():
    try:
        from megalith.kernels import ops
    except ImportError as exc:
        raise RuntimeError(
            "ModelConfig.kernels='fused' needs megalith.kernels.ops, which cannot be imported "
            f"({exc}); install a megalith-kernels build with the fused ops or use kernels='torch'"
        ) from exc
    return ops


def get_ops(kernels: str):
    """The op set named by ModelConfig.kernels."""
    if kernels == "torch":
        return TorchOps()
    if kernels == "fused":
        return FusedOps()
    raise ValueError(f"unknown kernels {kernels!r}; expected 'torch' or 'fused'")
