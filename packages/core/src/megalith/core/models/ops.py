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


class FusedOps:
    """Megalith's compiled kernels (megalith.kernels.ops), imported on first use."""

    name = "fused"

    def __init__(self):
        try:
            from megalith.kernels import ops
        except ImportError as exc:
            raise RuntimeError(
                "ModelConfig.kernels='fused' needs megalith.kernels.ops, which cannot be imported "
                f"({exc}); install a megalith-kernels build with the fused ops or use kernels='torch'"
            ) from exc
        self._ops = ops

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


def get_ops(kernels: str):
    """The op set named by ModelConfig.kernels."""
    if kernels == "torch":
        return TorchOps()
    if kernels == "fused":
        return FusedOps()
    raise ValueError(f"unknown kernels {kernels!r}; expected 'torch' or 'fused'")
