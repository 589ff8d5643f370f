"""Megalith's compiled core: fused kernels, dataset index builders and build information.

The compiled module (`megalith.kernels._C`) does not link against libtorch, so one wheel serves every
supported torch version; torch is only needed for `megalith.kernels.ops`, which registers the kernels as
torch operators. The dataset index builders need only numpy.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from megalith.kernels import _C
from megalith.kernels._auto import auto_choice

__all__ = ["__version__", "auto_choice", "build_info", "cuda_available", "cuda_unavailable_reason"]

try:
    __version__ = _metadata.version("megalith-kernels")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How this compiled module was built.

    Returns:
        A dict with `version`, `compiler`, `build_type`, `cxx_standard`, `cuda` (whether CUDA kernels are
        compiled in), `cuda_compiler`, `cuda_archs` (e.g. ``["80", "90a"]``) and `cuda_runtime` (the
        statically linked CUDA runtime version, or None).
    """
    return dict(_C.build_info())


def cuda_available() -> bool:
    """Whether the CUDA kernels can run now: compiled in, and a CUDA driver and device are present."""
    count, _ = _C.cuda_device_count()
    return count > 0


def cuda_unavailable_reason() -> str | None:
    """Why `cuda_available()` is False (None when it is True)."""
    count, reason = _C.cuda_device_count()
    return None if count > 0 else reason
