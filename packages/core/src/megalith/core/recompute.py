"""Activation recomputation, applied from outside the model, that replays dropout exactly.

`apply_recompute(model, "full" | "selective", every=k)` makes whole layers (every k-th by global index) or only
each layer's attention core recompute their activations in the backward pass instead of keeping them. The
module keeps its name and parameters: only its class is swapped for a subclass whose forward runs through
`checkpoint` while training (as FSDP2's `fully_shard` swaps classes), so checkpoints and parameter names are
unchanged.

torch.utils.checkpoint already restores the default generator for the recomputation; the streams of the
model's RNGTracker live outside it, so they are snapshotted when the forward runs and swapped back in while the
backward recomputes, then the advanced states are put back.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from megalith.core.parallel.random import RNGTracker

__all__ = ["RECOMPUTE_MODES", "apply_recompute", "checkpoint", "is_recomputed"]

RECOMPUTE_MODES = ("none", "selective", "full")
_CLASSES: dict[type, type] = {}


def checkpoint(fn, *args, rng: RNGTracker | None = None, **kwargs):
    """`fn(*args, **kwargs)` without keeping its activations; they are recomputed in the backward pass.

    Args:
        fn: the function to run (a layer's forward or the attention core).
        args, kwargs: its arguments.
        rng: the tracker whose streams `fn` may draw from; None if it draws from none.
    """
    if rng is None:
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    snapshot: dict = {}

    @contextlib.contextmanager
    def forward_context():
        snapshot.update(rng.get_states())
        yield

    @contextlib.contextmanager
    def recompute_context():
        current, replaying = rng.get_states(), rng.replaying
        rng.set_states(snapshot)
        rng.replaying = True
        try:
            yield
        finally:
            rng.set_states(current)
            rng.replaying = replaying

    return torch_checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (forward_context(), recompute_context()), **kwargs
    )


class _Recomputed:
    """Mixed in before a module's own class: its forward is recomputed in the backward pass while training."""

    def forward(self, *args, **kwargs):
        forward = super().forward
        if self.training and torch.is_grad_enabled():
            # Inside a compiled block torch.compile traces the checkpoint itself but not a context_fn; there is
            # no dropout to replay there (apply_compile refuses it), so the RNG streams need no swapping.
            rng = None if torch.compiler.is_compiling() else self._megalith_recompute_rng
            return checkpoint(forward, *args, rng=rng, **kwargs)
        return forward(*args, **kwargs)


def _recompute(module: nn.Module, rng: RNGTracker) -> None:
    cls = type(module)
    if issubclass(cls, _Recomputed):
        return
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Recomputed{cls.__name__}", (_Recomputed, cls), {"__module__": cls.__module__})
    module.__class__ = _CLASSES[cls]
    module._megalith_recompute_rng = rng


def is_recomputed(module: nn.Module) -> bool:
    return isinstance(module, _Recomputed)


def apply_recompute(model: nn.Module, mode: str, every: int = 1) -> nn.Module:
    """Recompute whole layers ("full", layers whose global index is a multiple of `every`) or the attention
    cores ("selective"); "none" leaves the model as it is. Works on a Transformer or any stage of one."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
    if every < 1:
        raise ValueError(f"recompute_every must be >= 1, got {every}")
    for layer in model.layers.values():
        if mode == "full" and layer.layer_id % every == 0:
            _recompute(layer, model.rng)
        elif mode == "selective":
            _recompute(layer.attn.core, model.rng)
    return model
