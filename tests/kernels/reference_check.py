"""The kernel tolerance rule of STYLE.md: against a float64 reference, a kernel's error may be at most about
twice the error of the plain PyTorch computation run in the kernel's dtype (flash-attention's rule).

`compare` runs an op and its reference on the same fresh inputs (forward and, with a random output
gradient, backward) and applies the rule to the output and to every input gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A small absolute floor (relative to the reference's magnitude) so that float32 results whose baseline
# error is a few ulps do not fail on summation-order noise.
_FLOOR = 1e-6


def max_error(value: torch.Tensor, expected64: torch.Tensor) -> float:
    return (value.double() - expected64).abs().max().item()


def assert_within_rule(name: str, value: torch.Tensor, expected64: torch.Tensor, baseline: torch.Tensor) -> None:
    assert value.shape == expected64.shape, f"{name}: shape {tuple(value.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(value).all(), f"{name}: non-finite values"
    err = max_error(value, expected64)
    base = max_error(baseline, expected64)
    limit = 2.0 * base + _FLOOR * (1.0 + expected64.abs().max().item())
    assert err <= limit, f"{name}: error {err:.3e} exceeds 2 x PyTorch's {base:.3e} (limit {limit:.3e})"


def compare(
    op: Callable,
    reference: Callable,
    tensors: Sequence[torch.Tensor],
    grad_inputs: Sequence[int],
    *extra,
    backward: bool = True,
) -> None:
    """Checks op(*tensors, *extra) against reference(...) in float64 and in the tensors' own dtype.

    Args:
        op: the kernel under test.
        reference: the plain PyTorch computation with the same signature.
        tensors: inputs in the kernel's dtype (floating ones are upcast for the float64 reference).
        grad_inputs: indices of `tensors` whose gradients are checked.
        extra: non-tensor arguments passed after the tensors.
        backward: whether to check gradients at all.
    """

    def prepared(dtype):
        out = []
        for i, t in enumerate(tensors):
            t = t.detach().to(dtype) if t.is_floating_point() and dtype is not None else t.detach().clone()
            out.append(t.requires_grad_(backward and i in grad_inputs))
        return out

    dtype = tensors[0].dtype
    kernel_in, ref_in, base_in = prepared(None), prepared(torch.float64), prepared(dtype)
    out = op(*kernel_in, *extra)
    ref = reference(*ref_in, *extra)
    base = reference(*base_in, *extra)
    assert_within_rule("output", out, ref, base)
    if not backward:
        return
    grad = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    base.backward(grad.to(base.dtype))
    for i in grad_inputs:
        assert_within_rule(f"grad of input {i}", kernel_in[i].grad, ref_in[i].grad, base_in[i].grad)
