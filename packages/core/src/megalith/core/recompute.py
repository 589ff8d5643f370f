"""Activation recomputation that replays dropout exactly (the model's RNG streams are restored too).

torch.utils.checkpoint already restores the default generator for the recomputation; the streams of the
model's RNGTracker live outside it, so they are snapshotted when the forward runs and swapped back in
while the backward recomputes, then the advanced states are put back.
"""

from __future__ import annotations

import contextlib

import torch.utils.checkpoint as torch_checkpoint

from megalith.core.parallel.random import RNGTracker


def checkpoint(fn, *args, rng: RNGTracker | None = None):
    """`fn(*args)` without keeping its activations; they are recomputed in the backward pass.

    Args:
        fn: the function to run (a layer's forward or the attention core).
        args: its tensor arguments.
        rng: the tracker whose streams `fn` may draw from; None if it draws from none.
    """
    if rng is None:
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    snapshot: dict = {}

    @contextlib.contextmanager
    def forward_context():
        snapshot.update(rng.get_states())
        yield

    @contextlib.contextmanager
    def recompute_context():
        current = rng.get_states()
        rng.set_states(snapshot)
        try:
            yield
        finally:
            rng.set_states(current)

    return torch_checkpoint.checkpoint(
        fn, *args, use_reentrant=False, context_fn=lambda: (forward_context(), recompute_context())
    )
