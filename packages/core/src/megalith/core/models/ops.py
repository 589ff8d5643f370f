"""The hot ops of the model behind one switch: plain PyTorch ("torch"), Megalith's fused kernels ("fused"), or per
op whichever was measured faster on the device and dtype of the call ("auto", the default).

The model is built with the torch op set; `apply_kernels(model, name)` swaps the op set of every module that
has one, from outside the model code. "auto" reads `megalith.kernels.auto_choice`: the table
`benchmarks/kernels.py --write-auto-table` measured (fused forward + backward against these torch ops at a training
shape, per device type, dtype and op); a combination it never measured, or a build without the fused ops, runs
torch. Shapes: x_BSND is [batch, sequence, heads, head_dim]; RoPE tables cos/sin
are [S, R] (positions shared by every row) or [B, S, R] (per-row positions, as when decoding), R = D/2.

Attention within packed documents (`documents`, see `megalith.core.models.packing`): the torch set gives SDPA a
block-diagonal causal mask (one [B, 1, S, S] boolean tensor: simple, but S x S); the fused set runs Megalith's
varlen kernel on the flattened batch (`attention_with_lse` with `cu_seqlens`), which never builds an S x S
tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchOps:
    """Reference implementations: scaled_dot_product_attention and elementwise PyTorch."""

    name = "torch"

    @staticmethod
    def attention(
        q_BSND, k_BTKD, v_BTKD, *, causal: bool = True, dropout_p: float = 0.0, mask_B1ST=None, documents=None
    ):
        """Softmax attention of S queries over T keys; `mask_B1ST` (True = visible) replaces the causal mask.

        Grouped-query attention (q head h reads kv head h // (N / K)) goes to SDPA as it is (`enable_gqa`), so
        the key/value heads are never copied N / K times. With `documents` (S == T), a query sees the keys of
        its own document only (a block-diagonal mask, causal within each block).
        """
        if documents is not None:
            ids_BS = documents.ids
            mask_B1ST = ids_BS[:, None, :, None] == ids_BS[:, None, None, :]
            if causal:
                mask_B1ST = mask_B1ST.tril()
        out_BNSD = F.scaled_dot_product_attention(
            q_BSND.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2),
            attn_mask=mask_B1ST, is_causal=causal and mask_B1ST is None, dropout_p=dropout_p,
            enable_gqa=q_BSND.shape[2] != k_BTKD.shape[2],
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
    def rope(x_BSND, cos, sin):
        half = x_BSND.shape[-1] // 2
        x1, x2 = x_BSND[..., :half], x_BSND[..., half:]
        cos, sin = cos.unsqueeze(-2).to(x_BSND.dtype), sin.unsqueeze(-2).to(x_BSND.dtype)  # [(B,) S, 1, R]
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
        fused_kernel_ops()  # fail at model construction, with the reason, rather than in the first forward

    @property
    def _ops(self):
        return fused_kernel_ops()

    def attention(
        self, q_BSND, k_BTKD, v_BTKD, *, causal: bool = True, dropout_p: float = 0.0, mask_B1ST=None, documents=None
    ):
        if dropout_p:
            raise ValueError("kernels='fused' attention has no dropout; set runtime.attention_dropout to 0")
        if mask_B1ST is not None:  # an arbitrary mask (decoding over a padded cache): the fused kernel has none
            return TorchOps.attention(q_BSND, k_BTKD, v_BTKD, causal=causal, mask_B1ST=mask_B1ST)
        if documents is None:
            return self._ops.attention(q_BSND, k_BTKD, v_BTKD, causal=causal)
        b, s, n, d = q_BSND.shape
        out, _ = self._ops.attention_with_lse(
            q_BSND.reshape(b * s, n, d), k_BTKD.flatten(0, 1), v_BTKD.flatten(0, 1), causal,
            cu_seqlens_q=documents.cu_seqlens, max_seqlen_q=documents.max_seqlen, max_seqlen_k=documents.max_seqlen,
        )  # fmt: skip
        return out.view(b, s, n, d)

    def rms_norm(self, x, weight, eps: float):
        return self._ops.rms_norm(x, weight, eps)

    def layer_norm(self, x, weight, bias, eps: float):
        return self._ops.layer_norm(x, weight, bias, eps)

    def rope(self, x_BSND, cos, sin):
        if cos.dim() == 3:  # per-row positions: the kernel takes one table, so rotate row by row
            return torch.cat([self._ops.rope(x_BSND[b : b + 1], cos[b], sin[b]) for b in range(cos.shape[0])])
        return self._ops.rope(x_BSND, cos, sin)

    def swiglu(self, gate, up):
        return self._ops.swiglu(gate, up)

    def gelu(self, x):
        return self._ops.bias_gelu(x, None, approximate="tanh")

    def cross_entropy(self, logits, target, *, ignore_index: int = -100, label_smoothing: float = 0.0):
        return self._ops.cross_entropy(
            logits.contiguous(), target, ignore_index=ignore_index, label_smoothing=label_smoothing
        )


# The model's op name -> the kernel's name in megalith.kernels.ops (and in the auto table), where they differ.
_KERNEL_NAME = {"gelu": "bias_gelu"}
_AUTO_OPS = ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "gelu", "cross_entropy")


class AutoOps:
    """Per op, the fused kernel or the torch ops, as the measured table says for the call's device type and dtype.

    The choice is made at each call from the input tensor (a model moved to another device or dtype follows),
    and cached per (op, device type, dtype). The usual combinations are resolved when the set is made, so a call
    that torch.compile traces only reads the cache (tracing cannot read the table's file).
    """

    name = "auto"

    def __init__(self):
        self._torch, self._fused = TorchOps(), None
        try:
            self._fused = FusedOps()
        except RuntimeError:  # no compiled fused ops in this build: torch everywhere
            self._fused = None
        self._chosen: dict[tuple[str, str, torch.dtype], object] = {}
        for device_type in ("cpu", "cuda"):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for op in _AUTO_OPS:
                    self.choice(op, device_type, dtype)

    def choice(self, op: str, device_type: str, dtype: torch.dtype):
        """The op set (TorchOps or FusedOps) this set runs `op` with on tensors of that device type and dtype."""
        key = (op, device_type, dtype)
        impl = self._chosen.get(key)
        if impl is None:
            fused = self._fused is not None and auto_kernel(_KERNEL_NAME.get(op, op), device_type, dtype) == "fused"
            impl = self._chosen[key] = self._fused if fused else self._torch
        return impl

    def _pick(self, op: str, x: torch.Tensor):
        return self.choice(op, x.device.type, x.dtype)

    def attention(self, q_BSND, k_BTKD, v_BTKD, *, causal: bool = True, dropout_p: float = 0.0, mask_B1ST=None,
                  documents=None):  # fmt: skip
        impl = self._torch if dropout_p else self._pick("attention", q_BSND)  # the kernel has no dropout
        return impl.attention(q_BSND, k_BTKD, v_BTKD, causal=causal, dropout_p=dropout_p, mask_B1ST=mask_B1ST,
                              documents=documents)  # fmt: skip

    def rms_norm(self, x, weight, eps: float):
        return self._pick("rms_norm", x).rms_norm(x, weight, eps)

    def layer_norm(self, x, weight, bias, eps: float):
        return self._pick("layer_norm", x).layer_norm(x, weight, bias, eps)

    def rope(self, x_BSND, cos, sin):
        return self._pick("rope", x_BSND).rope(x_BSND, cos, sin)

    def swiglu(self, gate, up):
        return self._pick("swiglu", gate).swiglu(gate, up)

    def gelu(self, x):
        return self._pick("gelu", x).gelu(x)

    def cross_entropy(self, logits, target, *, ignore_index: int = -100, label_smoothing: float = 0.0):
        return self._pick("cross_entropy", logits).cross_entropy(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing
        )


def auto_kernel(op: str, device_type: str, dtype: torch.dtype) -> str:
    """ "fused" or "torch": the measured faster implementation of kernel `op` (a name of megalith.kernels.ops) on
    that device type and dtype; "torch" where nothing was measured or the build has no fused ops."""
    try:
        from megalith.kernels import auto_choice, ops  # noqa: F401  (ops: the fused kernels must import too)
    except ImportError:
        return "torch"
    return auto_choice(op, device_type, dtype)


def fused_kernel_ops(user: str = "runtime.kernels='fused'"):
    """`megalith.kernels.ops`, or a RuntimeError saying that `user` needs it and why it cannot be imported."""
    try:
        from megalith.kernels import ops
    except ImportError as exc:
        raise RuntimeError(
            f"{user} needs megalith.kernels.ops, which cannot be imported ({exc}); install a megalith-kernels "
            "build with the fused ops or use kernels='torch'"
        ) from exc
    return ops


KERNELS = ("auto", "torch", "fused")


def get_ops(kernels: str):
    """The op set named `kernels` ("auto", "torch" or "fused")."""
    if kernels == "torch":
        return TorchOps()
    if kernels == "fused":
        return FusedOps()
    if kernels == "auto":
        return AutoOps()
    raise ValueError(f"unknown kernels {kernels!r}; expected one of {KERNELS}")


def apply_kernels(model: nn.Module, kernels: str) -> nn.Module:
    """Gives every module of `model` that computes with an op set (norms, attention, MLP) the set `kernels`."""
    ops = get_ops(kernels)
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    return model
