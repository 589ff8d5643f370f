"""Helpers shared by the op registrations: tensor descriptors for the compiled module, streams, checks."""

from __future__ import annotations

import functools
import itertools

import torch

from megalith.kernels import _C, build_info

_K = _C.kernels
# Codes shared with cpp/bindings/kernel_bindings.cpp.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int64: 3, torch.bool: 4, torch.int32: 5}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128)


def _desc(t: torch.Tensor | None, name: str):
    """The descriptor the compiled module reads; raises ValueError naming `name` for unusable tensors.

    It is built on every kernel call, so the common case (a strided cpu or cuda tensor of a known dtype)
    takes the cheapest attribute reads; the binding casts torch.Size and the stride tuple directly.
    """
    if t is None:
        return None
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise ValueError(f"{name} has dtype {t.dtype}, which the fused kernels do not take")
    if t.is_cuda:
        device = t.get_device()
    elif t.is_cpu:
        device = -1
    else:
        raise ValueError(f"{name} is on {t.device}; the fused kernels run on cpu or cuda tensors")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    return (t.data_ptr(), code, t.shape, t.stride(), device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when the kernels can read it in place, else a contiguous copy.

    The CPU kernels read rows spaced by one stride with a dense last dimension (the halves of a fused
    projection, a slice of a padded vocabulary), which needs the leading dimensions to merge into one; the
    CUDA kernels read contiguous tensors only.
    """
    if t.is_contiguous():
        return t
    if t.is_cpu and t.dim() > 0:
        dims = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True) if size != 1]
        inner_ok = t.shape[-1] == 1 or t.stride(-1) == 1
        merges = all(outer[1] == inner[1] * inner[0] for outer, inner in itertools.pairwise(dims))
        if inner_ok and merges and (not dims or dims[-1][1] >= 1):
            return t
    return t.contiguous()


def _inner_dense(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when the CPU kernels can read it in place (positive strides, dense last dim), else a copy."""
    if t.is_contiguous():
        return t
    if t.is_cpu and t.dim() > 0:
        inner_ok = t.shape[-1] == 1 or t.stride(-1) == 1
        if inner_ok and all(stride >= 1 or size == 1 for size, stride in zip(t.shape, t.stride(), strict=True)):
            return t
    return t.contiguous()


def _torch_uses_openmp() -> bool:
    """Whether torch's intra-op threads are an OpenMP team (its usual CPU builds)."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


@functools.cache
def _cuda_compiled() -> bool:
    return bool(build_info()["cuda"])


def _use_reference(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and not _cuda_compiled()


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type == "cpu" and t.dtype == torch.float16:
        raise ValueError(f"{name}: the CPU kernels take float32 or bfloat16, got float16")


def _empty_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)


class FusedOp:
    """One kernel as a torch custom op (what torch.compile, opcheck and dispatch see) with a direct eager path.

    Used as a decorator in place of ``torch.library.custom_op(name, mutates_args=())``, with the same
    ``register_fake`` and ``register_autograd``. A call with plain tensors outside torch.compile runs the
    implementation itself, through an ``autograd.Function`` built from the same setup_context and backward
    when a gradient is needed. The custom op's own route (dispatcher, autograd wrapper, redispatch, a
    torch._dynamo.disable guard) costs about 0.1 ms per forward + backward on the CPU, more than a norm
    kernel takes at training shapes. Under torch.compile, for tensor subclasses (fake, functional, DTensor)
    and for meta tensors the registered op runs, so both routes share one implementation and one backward.
    """

    def __init__(self, name: str, impl):
        self.impl = impl
        self.op = torch.library.custom_op(name, impl, mutates_args=())
        self._function: type[torch.autograd.Function] | None = None

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        # forward(ctx, ...) rather than a separate setup_context: Function.apply binds the arguments through
        # inspect.signature for the latter, which costs more than the custom op route this replaces.
        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(
            f"{impl.__name__}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        needs_grad = False
        for a in args:
            if isinstance(a, torch.Tensor):
                if (type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter) or a.is_meta:
                    return self.op(*args)  # a subclass or a meta tensor: its dispatch must see the op
                needs_grad = needs_grad or a.requires_grad
        if not (needs_grad and torch.is_grad_enabled()):
            return self.impl(*args)
        if self._function is None:
            return self.op(*args)  # no autograd formula: the op says so when a gradient reaches it
        return self._function.apply(*args)


def fused_op(name: str):
    """Decorator: `FusedOp(name, fn)`."""
    return lambda impl: FusedOp(name, impl)
