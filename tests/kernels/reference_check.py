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
    infinite = torch.isinf(expected64)
    if infinite.any():
        # Exactly infinite results (the log-sum-exp of an attention row that sees no key is -inf) must match.
        assert torch.equal(value.double()[infinite], expected64[infinite]), f"{name}: infinite entries differ"
        value, expected64, baseline = value[~infinite], expected64[~infinite], baseline[~infinite]
        if value.numel() == 0:
            return
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
    # An op may return several tensors (attention: out and lse); each is checked and each gets a gradient.
    outs, refs, bases = ((t,) if isinstance(t, torch.Tensor) else tuple(t) for t in (out, ref, base))
    for i, (o, r, b) in enumerate(zip(outs, refs, bases, strict=True)):
        assert_within_rule("output" if len(outs) == 1 else f"output {i}", o, r, b)
    if not backward:
        return
    grads = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs, strict=True)])
    torch.autograd.backward(refs, grads)
    torch.autograd.backward(bases, [g.to(b.dtype) for g, b in zip(grads, bases, strict=True)])
    for i in grad_inputs:
        assert_within_rule(f"grad of input {i}", kernel_in[i].grad, ref_in[i].grad, base_in[i].grad)
