"""Every private torch API Megalith uses, in one module; tests/core/test_torch_compat.py checks each one.

torch may rename or change anything private in any release. Keeping the uses here means a new torch that breaks one
fails that test with the function's name, and supporting it means editing this file only. Prefer a public API: add
something here only when none does the job, and say why in its docstring.
"""

from __future__ import annotations

import torch

__all__ = ["is_view", "version_counter"]


def is_view(t: torch.Tensor) -> bool:
    """Whether `t` is a view of another tensor (it shares that tensor's storage and autograd version counter).

    torch has no public predicate for this. `Tensor._base` holds the tensor a view was taken from (None for a
    tensor that is not a view); autograd's own view tracking sets it.
    """
    return t._base is not None


def version_counter(t: torch.Tensor) -> int:
    """The autograd version counter of `t`: it grows with every in-place change, so a cached value derived from
    `t` is still valid while the counter is unchanged. Inference tensors have none (check `is_inference()` first).

    torch has no public accessor; `Tensor._version` is the counter autograd itself checks for saved tensors.
    """
    return t._version
